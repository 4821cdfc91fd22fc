"""Which keys name a secret, and values made safe to show: MLflow params, the resolved config,
log lines and error messages all go through `mask`.

Kept free of imports from the rest of the package: config loading (which must not echo the
value it rejects) and tracking (which imports config) both use it.
"""

from __future__ import annotations

import re

MASK = "***"

# Matched anywhere in the key, any case, so glued names are caught too (keyStorePassword,
# javax.jdo.option.ConnectionPassword, hive.metastore.dbpassword).
_SECRET_PARTS = ("password", "passwd", "pwd", "passphrase", "secret", "credential")
# `key` is a secret only next to one of these: account.key, encryption_key, accessKey, ...
_KEY_CONTEXT = {"access", "api", "private", "auth", "account", "encryption", "sas", "storage",
                "signing", "master", "shared"}  # fmt: skip
_SECRET_PAIRS = {(w, "key") for w in _KEY_CONTEXT}
_GLUED_KEYS = {f"{w}key" for w in _KEY_CONTEXT}
# `token` is a secret as the noun that ends a key (session.token, auth_token, hfToken), but not
# a vocabulary entry (pad_token) or a count (max_token); `min_token_length` and `max_tokens`
# never end in the word.
_NOT_SECRET_TOKENS = {"pad", "eos", "bos", "unk", "mask", "cls", "sep", "special", "start", "end",
                      "min", "max", "num", "n", "count", "per", "first", "last"}  # fmt: skip

# A scheme starts only after a non-scheme character and a password is at most 1024 characters
# (it may hold an unescaped '/', as AWS secret keys do): the scan of any text stays linear.
_URI_USERINFO = re.compile(
    r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@\s]{1,1024}@"
)
# name=value or 'name': 'value' inside free text (a JDBC URL's ?password=..., a log line naming
# a Spark setting, a dict's repr); the value is masked when the name is a secret's. A bare
# `name: text` is left alone: error messages are written `key: what is wrong`. A name starts
# only after a non-name character, which keeps a long run of letters (a base64 blob) linear.
_ASSIGNMENT = re.compile(
    r"(?<![\w.\-])(?P<name>[A-Za-z][\w.\-]*)(?P<sep>\s*=\s*[\"']?|[\"']\s*:\s*[\"']?)"
    r"(?P<value>(?<=[\"'])[^\"']+|[^\s\"'&;,}\]]+)"
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def key_words(key: str) -> list[str]:
    """The lower-case words of a key: split on . _ - / : spaces and camelCase humps
    (awsSecretAccessKey -> aws secret access key; SASToken -> sas token)."""
    return [w.lower() for w in re.split(r"[._\-/:\s]+", _CAMEL.sub(" ", key)) if w]


def is_secret(key: str) -> bool:
    """Whether a key (a dotted config path or a Spark/Hadoop setting) names a secret."""
    low = key.lower()
    if any(part in low for part in _SECRET_PARTS):
        return True
    words = key_words(key)
    if not words:
        return False
    pairs = set(zip(words, words[1:], strict=False))
    if _GLUED_KEYS & set(words) or _SECRET_PAIRS & pairs:
        return True
    if ("azure", "sas") in pairs and words[-1] != "type":  # fs.azure.sas.<container>.<account>
        return True  # holds a SAS token; only the token provider's class name is not one
    last = words[-1]
    before = words[-2] if len(words) > 1 else ""
    return last.endswith("token") and not (last == "token" and before in _NOT_SECRET_TOKENS)


def mask(key: str, value: str) -> str:
    """A value safe to show: the whole value when the key names a secret, else passwords in
    URIs (scheme://user:***@host) and secret `name=value` pairs inside it."""
    if value and is_secret(key):
        return MASK
    value = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", value)
    return _ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{MASK}" if _hides(m) else m[0], value)


def _hides(m: re.Match[str]) -> bool:
    return m["value"] != "..." and is_secret(m["name"])  # `pass KEY=...` in a hint is no secret
