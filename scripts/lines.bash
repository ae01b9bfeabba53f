# The Home Assistant lines the project tests, shared by scripts/setup, scripts/test and scripts/lint (sourced).
#
#   line     venv            lock                          interpreter
#   2025.4   .venv           requirements/ha-2025.4.lock   Python 3.13 (the floor: HA 2025.4.4, hacs.json's minimum)
#   2026.2   .venv-2026.2    requirements/ha-2026.2.lock   Python 3.13 (the newest HA a Python 3.13 install can run)
#   2026.10  .venv-2026.10   requirements/ha-2026.10.lock  Python 3.14 (the newest HA the test plugin pairs with)
#
# A selection is a list of line names or aliases, separated by spaces or commas:
#   all (default; "both" is its old name), 2025 (= 2025.4), 2026 (= 2026.2 2026.10), or the names above.

RKLLM_LINES=(2025.4 2026.2 2026.10)

# line_venv <line>: the venv directory of a line.
line_venv() {
    case $1 in
        2025.4) echo .venv ;;
        *) echo ".venv-$1" ;;
    esac
}

# line_lock <line>: the lock file a line's venv is synced from.
line_lock() { echo "requirements/ha-$1.lock"; }

# line_ha_version <line>: the homeassistant version the line pins (read from its .in file).
line_ha_version() { sed -n 's/^homeassistant==\([0-9.]*\).*/\1/p' "requirements/ha-$1.in"; }

# line_label <line>: how output names a line ("Home Assistant 2026.10.4").
line_label() { echo "Home Assistant $(line_ha_version "$1")"; }

# line_python_series <line>: the Python minor version the line's venv uses.
line_python_series() {
    case $1 in
        2026.10) echo 3.14 ;;
        *) echo 3.13 ;;
    esac
}

# select_lines <selection...>: print the selected lines, one per line, in RKLLM_LINES order; returns 1 and prints
# the offending word on stderr for an unknown name.
select_lines() {
    local word line
    local -A wanted=()
    # shellcheck disable=SC2048,SC2086  # word-split on commas and spaces on purpose
    for word in ${*//,/ }; do
        case $word in
            all | both) for line in "${RKLLM_LINES[@]}"; do wanted[$line]=1; done ;;
            2025 | 2025.4) wanted[2025.4]=1 ;;
            2026) wanted[2026.2]=1 wanted[2026.10]=1 ;;
            2026.2 | 2026.10) wanted[$word]=1 ;;
            *)
                echo "$word" >&2
                return 1
                ;;
        esac
    done
    ((${#wanted[@]})) || for line in "${RKLLM_LINES[@]}"; do wanted[$line]=1; done
    for line in "${RKLLM_LINES[@]}"; do
        [[ -n ${wanted[$line]:-} ]] && echo "$line"
    done
    return 0
}
