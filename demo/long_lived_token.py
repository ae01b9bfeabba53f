"""Print a long-lived access token for the scripts/develop Home Assistant (README "Try it on the emulator").

Logs in like the frontend does (login flow → authorization code → access token), then asks the websocket
API for a long-lived token, so a fresh dev instance needs no onboarding and no browser.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CREDENTIALS = REPO_ROOT / "config" / ".develop_user.json"


class TokenError(Exception):
    """A step of the login failed; the message says which and what Home Assistant answered."""


def load_credentials(path: Path) -> tuple[str, str]:
    """Read the user scripts/develop created; a missing file means develop has not run yet."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenError(f"{path} does not exist: run scripts/develop first, or pass --username/--password") from None
    except (OSError, ValueError) as err:
        raise TokenError(f"cannot read {path}: {err}") from err
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise TokenError(f"{path} must hold a JSON object with string 'username' and 'password'")
    return username, password


async def _post_json(session: aiohttp.ClientSession, url: str, payload: dict[str, Any], step: str) -> dict[str, Any]:
    """POST JSON and return the JSON object answer, or fail naming the step."""
    async with session.post(url, json=payload) as response:
        body = await response.text()
        if response.status != 200:
            raise TokenError(f"{step}: HTTP {response.status}: {body.strip()[:200]}")
    answer = json.loads(body)
    if not isinstance(answer, dict):
        raise TokenError(f"{step}: expected a JSON object, got {body[:200]}")
    return answer


async def wait_until_up(session: aiohttp.ClientSession, base_url: str, wait_s: float) -> None:
    """Retry until the HTTP server answers at all, so this can run right after scripts/develop starts."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            async with session.get(f"{base_url}/auth/providers") as response:
                await response.read()
                return
        except aiohttp.ClientConnectionError as err:
            if time.monotonic() >= deadline:
                raise TokenError(f"Home Assistant does not answer at {base_url} after {wait_s:.0f} s: {err}") from err
        await asyncio.sleep(1.0)


async def login(session: aiohttp.ClientSession, base_url: str, username: str, password: str) -> str:
    """Run the login flow with the built-in provider and return a short-lived access token."""
    client_id = f"{base_url}/"
    flow = await _post_json(
        session,
        f"{base_url}/auth/login_flow",
        {"client_id": client_id, "handler": ["homeassistant", None], "redirect_uri": client_id},
        "starting the login flow",
    )
    step = await _post_json(
        session,
        f"{base_url}/auth/login_flow/{flow['flow_id']}",
        {"client_id": client_id, "username": username, "password": password},
        "logging in",
    )
    if step.get("type") != "create_entry":
        raise TokenError(f"logging in as {username!r} failed: {step.get('errors') or step}")
    form = {"grant_type": "authorization_code", "code": step["result"], "client_id": client_id}
    async with session.post(f"{base_url}/auth/token", data=form) as response:
        body = await response.text()
        if response.status != 200:
            raise TokenError(f"exchanging the authorization code: HTTP {response.status}: {body.strip()[:200]}")
    token = json.loads(body).get("access_token")
    if not isinstance(token, str):
        raise TokenError(f"exchanging the authorization code: no access_token in {body[:200]}")
    return token


async def create_long_lived_token(
    session: aiohttp.ClientSession, base_url: str, access_token: str, client_name: str, lifespan_days: int
) -> str:
    """Ask the websocket API for a long-lived token (the only API that issues them)."""
    ws_url = base_url.replace("http", "ws", 1) + "/api/websocket"
    async with session.ws_connect(ws_url) as websocket:
        hello = await websocket.receive_json()
        if hello.get("type") != "auth_required":
            raise TokenError(f"websocket: unexpected greeting {hello}")
        await websocket.send_json({"type": "auth", "access_token": access_token})
        auth = await websocket.receive_json()
        if auth.get("type") != "auth_ok":
            raise TokenError(f"websocket authentication failed: {auth.get('message') or auth}")
        await websocket.send_json(
            {"id": 1, "type": "auth/long_lived_access_token", "client_name": client_name, "lifespan": lifespan_days}
        )
        result = await websocket.receive_json()
    if not result.get("success") or not isinstance(result.get("result"), str):
        raise TokenError(f"creating the long-lived token failed: {result.get('error') or result}")
    token: str = result["result"]
    return token


def resolve_credentials(args: argparse.Namespace) -> tuple[str, str]:
    """The user to log in as: both flags, or the file scripts/develop wrote (checked before any network I/O)."""
    if args.username and args.password:
        return str(args.username), str(args.password)
    if args.username or args.password:
        raise TokenError("pass both --username and --password, or neither (then config/.develop_user.json is used)")
    return load_credentials(args.credentials)


async def fetch_token(args: argparse.Namespace, username: str, password: str) -> str:
    """Log in and return a new long-lived token."""
    base_url = args.url.rstrip("/")
    # Long-lived token names must be unique per user: a timestamp keeps repeated runs working.
    client_name = args.name or f"rkllm develop {time.strftime('%Y-%m-%d %H:%M:%S')}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await wait_until_up(session, base_url, args.wait)
        access_token = await login(session, base_url, username, password)
        return await create_long_lived_token(session, base_url, access_token, client_name, args.lifespan_days)


def main(argv: list[str] | None = None) -> int:
    """Print the token on stdout (and nothing else), errors as one line on stderr."""
    parser = argparse.ArgumentParser(prog="scripts/token", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8123", help="Home Assistant base URL")
    parser.add_argument("--username", help="default: the user scripts/develop created")
    parser.add_argument("--password", help="default: from config/.develop_user.json")
    parser.add_argument("--credentials", type=Path, default=DEFAULT_CREDENTIALS, help=argparse.SUPPRESS)
    parser.add_argument("--name", help="token name shown in the user profile (must be unique per user)")
    parser.add_argument("--lifespan-days", type=int, default=3650)
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for Home Assistant to answer")
    args = parser.parse_args(argv)
    try:
        username, password = resolve_credentials(args)
        token = asyncio.run(fetch_token(args, username, password))
    except TokenError as err:
        print(f"scripts/token: error: {err}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, TimeoutError) as err:
        print(f"scripts/token: error: talking to {args.url} failed: {err!r}", file=sys.stderr)
        return 1
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
