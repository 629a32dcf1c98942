"""The person at the browser, played with plain HTTP: opens the verification page of a device code,
confirms (or aborts) it, signs in on oidc-provider's development login form and consents (or cancels).

No browser and no JavaScript: each page's forms are read with the standard library's HTML parser and
submitted as a browser would (hidden fields included, cookies kept in one jar per person), so what the
provider sees is what a real user agent sends. The only page with a script, the auto-submitting
``form_post`` page of the complete verification URI, is submitted by hand as its ``<noscript>`` asks.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field
from html.parser import HTMLParser

import httpx

__all__ = ["ApprovalError", "Decision", "Outcome", "play"]

_MAX_PAGES = 12


class ApprovalError(AssertionError):
    """The provider did not lead the person where the test expected (unknown code, expired, an error page)."""


class Decision(enum.Enum):
    APPROVE = "approve"          # confirm the code, sign in, consent
    ABORT_AT_CONFIRM = "abort"   # the "[ Abort ]" button of the "Confirm Device" page
    CANCEL_AT_CONSENT = "cancel"  # sign in, then the "[ Cancel ]" link of the consent page


class Outcome(enum.Enum):
    APPROVED = "approved"  # "Sign-in Success": the device's next poll gets tokens
    DENIED = "denied"      # "The Sign-in request was interrupted": the device gets access_denied


@dataclass
class _Form:
    id: str | None
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)
    buttons: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Page:
    url: httpx.URL
    status: int
    title: str = ""
    forms: list[_Form] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def form(self, *, form_id: str | None = None, prompt: str | None = None) -> _Form | None:
        for f in self.forms:
            if form_id is not None and f.id == form_id:
                return f
            if prompt is not None and f.fields.get("prompt") == prompt:
                return f
        return None

    def summary(self) -> str:
        words = " ".join(" ".join(self.text).split())
        return f"{self.status} {self.url} [{self.title}] {words[:400]}"


class _PageParser(HTMLParser):
    def __init__(self, page: _Page) -> None:
        super().__init__(convert_charrefs=True)
        self.page = page
        self._open: _Form | None = None
        self._by_id: dict[str, _Form] = {}
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("script", "style", "title"):
            self._in.append(tag)
        if tag == "form":
            self._open = _Form(id=a.get("id") or None, action=a.get("action", ""),
                               method=a.get("method", "get").lower())
            self.page.forms.append(self._open)
            if self._open.id:
                self._by_id[self._open.id] = self._open
        elif tag in ("input", "button"):
            owner = self._by_id.get(a["form"]) if "form" in a else self._open
            name = a.get("name")
            if owner is None or not name:
                return
            kind = a.get("type", "submit" if tag == "button" else "text").lower()
            if kind == "submit":
                owner.buttons.append((name, a.get("value", "")))
            elif kind not in ("checkbox", "radio") or "checked" in a:
                owner.fields[name] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.page.links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        if self._in and self._in[-1] == "title":
            self.page.title += data.strip()
        elif not self._in and data.strip():
            self.page.text.append(data.strip())


def _read(response: httpx.Response) -> _Page:
    page = _Page(url=response.url, status=response.status_code)
    if "html" in response.headers.get("content-type", ""):
        parser = _PageParser(page)
        parser.feed(response.text)
        parser.close()
    return page


def _submit(client: httpx.Client, page: _Page, form: _Form, extra: dict[str, str] | None = None) -> _Page:
    data = {**form.fields, **(extra or {})}
    url = page.url.join(form.action) if form.action else page.url
    if form.method == "post":
        return _read(client.post(url, data=data))
    return _read(client.get(url, params=data))


def play(verification: str, *, issuer: str, ca: ssl.SSLContext, login: str, decision: Decision,
         password: str = "any password") -> Outcome:
    """Walk the provider's pages for one device code as a person would and return where it ended.

    ``verification`` is a ``verification_uri_complete`` (opened as is) or a bare ``user_code`` (typed
    into the form at ``<issuer>/device``). Raises :class:`ApprovalError` on any page the walk does not
    expect, quoting it."""
    with httpx.Client(verify=ca, follow_redirects=True, timeout=15.0) as client:
        if verification.startswith(("https://", "http://")):
            page = _read(client.get(verification))
        else:
            page = _read(client.get(f"{issuer}/device"))
            entry = page.form(form_id="op.deviceInputForm")
            if entry is None:
                raise ApprovalError(f"no user-code form at {issuer}/device: {page.summary()}")
            page = _submit(client, page, entry, {"user_code": verification})
        for _ in range(_MAX_PAGES):
            if page.title == "Sign-in Success":
                return Outcome.APPROVED
            if any("request was interrupted" in t for t in page.text):
                return Outcome.DENIED
            if page.title == "Submitting Callback" and page.forms:
                page = _submit(client, page, page.forms[0])
            elif (confirm := page.form(form_id="op.deviceConfirmForm")) is not None:
                if decision is Decision.ABORT_AT_CONFIRM:
                    page = _submit(client, page, confirm, {"abort": "yes"})
                else:
                    page = _submit(client, page, confirm)
            elif (sign_in := page.form(prompt="login")) is not None:
                page = _submit(client, page, sign_in, {"login": login, "password": password})
            elif (consent := page.form(prompt="consent")) is not None:
                if decision is Decision.CANCEL_AT_CONSENT:
                    cancel = next((href for href in page.links if "/abort" in href), None)
                    if cancel is None:
                        raise ApprovalError(f"no cancel link on the consent page: {page.summary()}")
                    page = _read(client.get(page.url.join(cancel)))
                else:
                    page = _submit(client, page, consent)
            else:
                raise ApprovalError(f"unexpected page while approving {verification!r}: {page.summary()}")
        raise ApprovalError(f"still not done after {_MAX_PAGES} pages: {page.summary()}")


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.oidc.person approve|deny URL --issuer I --ca CA [--login L]``: the person, as a
    process, for a provider inside a test's network namespace (run it there with ``ip netns exec``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.oidc.person")
    p.add_argument("decision", choices=["approve", "deny"])
    p.add_argument("verification")
    p.add_argument("--issuer", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--login", default="nikita@acme.com")
    args = p.parse_args(argv)
    decision = Decision.APPROVE if args.decision == "approve" else Decision.ABORT_AT_CONFIRM
    outcome = play(args.verification, issuer=args.issuer, ca=ssl.create_default_context(cafile=args.ca),
                   login=args.login, decision=decision)
    print(outcome.value)
    return 0 if outcome is (Outcome.APPROVED if decision is Decision.APPROVE else Outcome.DENIED) else 1


if __name__ == "__main__":
    raise SystemExit(main())
