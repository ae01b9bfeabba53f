"""Draw the integration's brand icon (custom_components/rkllm/brand/icon.png): a chip with a chat bubble.

Original artwork made from a few shapes, rendered with 4x4 supersampling and written as an RGBA PNG with zlib
and struct only, so it can be regenerated anywhere: `python3 packaging/make_icon.py [OUTPUT]`.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

SIZE: Final = 256
SAMPLES: Final = 4  # per axis

RGBA = tuple[int, int, int, int]
Shape = Callable[[float, float], bool]

PIN: Final[RGBA] = (144, 164, 174, 255)
BODY: Final[RGBA] = (38, 50, 56, 255)
DIE: Final[RGBA] = (0, 150, 136, 255)
BUBBLE: Final[RGBA] = (255, 255, 255, 255)
DOT: Final[RGBA] = (0, 150, 136, 255)


def rounded_rect(left: float, top: float, right: float, bottom: float, radius: float) -> Shape:
    """Inside test of a rounded rectangle."""

    def inside(x: float, y: float) -> bool:
        if not (left <= x <= right and top <= y <= bottom):
            return False
        cx = min(max(x, left + radius), right - radius)
        cy = min(max(y, top + radius), bottom - radius)
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2

    return inside


def circle(cx: float, cy: float, radius: float) -> Shape:
    """Inside test of a disc."""
    return lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= radius**2


def triangle(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> Shape:
    """Inside test of a triangle (either winding)."""

    def edge(p: tuple[float, float], q: tuple[float, float], x: float, y: float) -> float:
        return (q[0] - p[0]) * (y - p[1]) - (q[1] - p[1]) * (x - p[0])

    def inside(x: float, y: float) -> bool:
        signs = (edge(a, b, x, y), edge(b, c, x, y), edge(c, a, x, y))
        return all(s >= 0 for s in signs) or all(s <= 0 for s in signs)

    return inside


def layers() -> list[tuple[Shape, RGBA]]:
    """Back to front: pins, chip body, die, chat bubble with its tail, three dots."""
    shapes: list[tuple[Shape, RGBA]] = []
    for index in range(5):
        offset = 60 + index * 34
        shapes.append((rounded_rect(offset - 7, 14, offset + 7, 242, 4), PIN))  # top and bottom pins
        shapes.append((rounded_rect(14, offset - 7, 242, offset + 7, 4), PIN))  # left and right pins
    shapes.append((rounded_rect(36, 36, 220, 220, 22), BODY))
    shapes.append((rounded_rect(58, 58, 198, 198, 16), DIE))
    shapes.append((rounded_rect(78, 84, 178, 150, 24), BUBBLE))
    shapes.append((triangle((100, 146), (128, 146), (96, 174)), BUBBLE))
    for cx in (104, 128, 152):
        shapes.append((circle(cx, 117, 8), DOT))
    return shapes


def render() -> bytes:
    """Raw RGBA scanlines, each prefixed with PNG filter type 0."""
    shapes = layers()
    rows = bytearray()
    step = 1.0 / SAMPLES
    for py in range(SIZE):
        rows.append(0)
        for px in range(SIZE):
            totals = [0.0, 0.0, 0.0, 0.0]
            for sy in range(SAMPLES):
                for sx in range(SAMPLES):
                    x = px + (sx + 0.5) * step
                    y = py + (sy + 0.5) * step
                    color: RGBA = (0, 0, 0, 0)
                    for shape, fill in reversed(shapes):
                        if shape(x, y):
                            color = fill
                            break
                    alpha = color[3] / 255.0
                    totals[0] += color[0] * alpha
                    totals[1] += color[1] * alpha
                    totals[2] += color[2] * alpha
                    totals[3] += alpha
            coverage = totals[3]
            if coverage == 0:
                rows.extend((0, 0, 0, 0))
                continue
            rows.extend(
                (
                    round(totals[0] / coverage),
                    round(totals[1] / coverage),
                    round(totals[2] / coverage),
                    round(255 * coverage / (SAMPLES * SAMPLES)),
                )
            )
    return bytes(rows)


def png(raw: bytes) -> bytes:
    """A PNG file: signature, IHDR (8-bit RGBA), one IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", SIZE, SIZE, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def main(argv: list[str]) -> int:
    """Write the icon (default: the integration's brand/icon.png)."""
    default = Path(__file__).resolve().parent.parent / "custom_components/rkllm/brand/icon.png"
    output = Path(argv[0]) if argv else default
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(png(render()))
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
