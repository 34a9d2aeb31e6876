"""The approval page at `/device`, for a person holding a phone or a browser.

It mirrors what authentik shows (`device_init.py`, `device_finish.py`): a form with one
field, "Device code", numeric and digits-only; a consent step naming the application;
and the finish text "You've successfully authenticated your device. You may close this
page now.". Unlike authentik, the consent step repeats the code back, in the groups the
device's screen draws, so the person can compare it with the device, as RFC 8628
§3.3.1 and §5.4 recommend; it names the device when told its name, and says in words
what each scope allows; and it offers Deny, which authentik cannot express to the
device but other providers do.

Every value is passed through `html.escape`: the page shows what the visitor typed.
No scripts, no external assets, so it works on any phone over plain loopback HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape

from agent.display.screens import code_groups  # the groups the screen draws

__all__ = [
    "SCOPE_WORDS",
    "confirm_page",
    "denied_page",
    "entry_page",
    "finished_page",
    "message_page",
]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:1.5rem;background:#f4f5f7;color:#1c1e21}
main{max-width:26rem;margin:0 auto;background:#fff;border-radius:.75rem;padding:1.5rem;
box-shadow:0 1px 4px rgba(0,0,0,.12)}
h1{font-size:1.3rem;margin-top:0}
label{display:block;font-weight:600;margin:1rem 0 .4rem}
input,select{width:100%;box-sizing:border-box;font-size:1.3rem;padding:.6rem;
border:1px solid #bbb;border-radius:.4rem}
.code{font-family:ui-monospace,monospace;font-size:1.8rem;letter-spacing:.15em;
text-align:center;margin:.5rem 0}.code span+span{margin-left:.6em}
.buttons{display:flex;gap:.75rem;margin-top:1.25rem}
button{flex:1;font-size:1.1rem;padding:.8rem;border:0;border-radius:.4rem;cursor:pointer}
.approve{background:#0b6bcb;color:#fff}.deny{background:#e4e6eb;color:#1c1e21}
ul{padding-left:1.2rem}.muted{color:#606770;font-size:.9rem}
"""


# What each scope of the default blueprint lets the device do, for a person to judge.
SCOPE_WORDS = {
    "openid": "your identity",
    "profile": "your name and username",
    "email": "your email address",
    "offline_access": "stay signed in",
}


def _document(title: str, body: str) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def entry_page(action: str = "/device", *, lenient: bool = False) -> str:
    """The "Device code" form. Digits only, as authentik's stage marks it: typing the
    grouping spaces or dashes a screen may show fails the browser's validation.
    `lenient` drops that rule, for a provider that ignores them."""
    pattern = "" if lenient else 'pattern="[0-9]*" '
    hint = "<p>Spaces and dashes are fine.</p>" if lenient else ""
    return _document("Device code", (
        "<h1>Sign in a device</h1>"
        f"<p>Enter the code shown on the device.</p>{hint}"
        f'<form method="get" action="{escape(action)}">'
        '<label for="code">Device code</label>'
        f'<input id="code" name="code" type="text" inputmode="numeric" {pattern}'
        'autocomplete="one-time-code" required autofocus>'
        '<div class="buttons"><button class="approve" type="submit">Continue</button></div>'
        "</form>"
    ))


def confirm_page(*, user_code: str, application: str, scopes: Iterable[str],
                 users: Mapping[str, Mapping[str, str]], device_name: str | None = None,
                 action: str = "/device") -> str:
    """The consent step: "You're about to sign into <app>", the device and its code for
    comparison, what it may do, who signs in, and Approve or Deny."""
    options = "".join(
        f'<option value="{escape(name)}">'
        f"{escape(claims.get('name', name))} ({escape(name)})</option>"
        for name, claims in users.items()
    )
    scope_items = "".join(
        f"<li>{escape(scope)}: {escape(SCOPE_WORDS[scope])}</li>" if scope in SCOPE_WORDS
        else f"<li>{escape(scope)}</li>"
        for scope in scopes)
    permissions = (f"<p>It asks for:</p><ul>{scope_items}</ul>" if scope_items else "")
    device = (f"<p>Device: <strong>{escape(device_name)}</strong></p>"
              if device_name else "")
    # No character between the groups: a copied code must stay what the form takes.
    shown = "".join(f"<span>{escape(group)}</span>" for group in code_groups(user_code))
    return _document(f"Sign in to {application}", (
        f"<h1>You're about to sign into {escape(application)}</h1>"
        f"{device}"
        "<p>Check that the device shows this code:</p>"
        f'<p class="code">{shown}</p>'
        f"{permissions}"
        f'<form method="post" action="{escape(action)}">'
        f'<input type="hidden" name="code" value="{escape(user_code)}">'
        f'<label for="user">Sign in as</label><select id="user" name="user">{options}</select>'
        '<div class="buttons">'
        '<button class="approve" type="submit" name="action" value="approve">Approve</button>'
        '<button class="deny" type="submit" name="action" value="deny">Deny</button>'
        "</div></form>"
    ))


def finished_page(*, approved: bool) -> str:
    if approved:
        return _document("Device signed in", (
            "<h1>Done</h1><p>You've successfully authenticated your device. "
            "You may close this page now.</p>"
        ))
    return _document("Sign-in denied", (
        "<h1>Sign-in denied</h1><p>The device will not be signed in. "
        "You may close this page now.</p>"
    ))


def denied_page(entry: str = "/device") -> str:
    """What authentik shows for an unknown or no longer valid code."""
    return _document("Permission denied", (
        "<h1>Permission denied</h1>"
        "<p>This code is not valid. It may have expired or already been used.</p>"
        f'<p class="muted"><a href="{escape(entry)}">Enter a code</a></p>'
    ))


def message_page(title: str, text: str) -> str:
    return _document(title, f"<h1>{escape(title)}</h1><p>{escape(text)}</p>")
