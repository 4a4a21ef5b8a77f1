"""Secrets kept out of everything a run writes or prints: the one place that decides what is secret.

A value is secret when the key it is under says so (in the mappings a user fills freely: `storage_options`,
`engine_options.vllm_kwargs`, `generation_options.extra`, ...: `key`, `secret`, `token`, `password`,
`credentials`, `api_key`, `session_token`, ...), or when it looks like a credential wherever it is (a URL's
password, a signed URL's signature, an AWS key id, a Hugging Face / OpenAI / GitHub token, a private key).
`scrub_config` gives a run's config with those values masked (config.yaml, `--cfg job`, status, preflight);
`text` masks them in a line (every log line, the one-line error, a traceback): the secret values of every
config the process loaded (`remember`) and every credential-looking string.

What a reader would get wrong: the schema's own fields (`primary_key`, `max_tokens`, `stop_token_ids`, ...) are
never secret by their name; only keys inside the free mappings are judged by name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, List, Mapping, Set

MASK = "***"

# a key (split into words at _ - . and camelCase) is secret when any word is one of these ...
SECRET_WORDS = {"secret", "secrets", "password", "passwd", "pwd", "passphrase", "credential", "credentials", "auth",
                "authorization", "apikey", "signature", "sig", "cookie", "bearer", "sas"}
# ... or its last word is one of these (key, access_key, api_key, token, hf_token, session_token; not key_file)
SECRET_LAST_WORDS = {"key", "token", "pat"}
SECRET_NAMES = {"connection_string", "conn_str"}  # Azure's (it holds AccountKey=...)

_QUERY_KEYS = ("x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|signature|"
               "sig|token|access_token|api_key|apikey|key|secret|password|sas")
PATTERNS = [  # (regex, group of the secret part); the other groups are kept
    (re.compile(r"([a-z][a-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(@)", re.I), 2),  # scheme://user:PASSWORD@host
    (re.compile(rf"([?&](?:{_QUERY_KEYS})=)([^&\s#\"']+)", re.I), 2),  # ?X-Amz-Signature=..., &sig=...
    (re.compile(r"((?:AccountKey|SharedAccessSignature|SharedAccessKey)=)([^;\s\"']+)", re.I), 2),  # Azure
    (re.compile(r"(\bbearer\s+)([A-Za-z0-9._~+/-]{16,}=*)", re.I), 2),
    (re.compile(r"()(\b(?:AKIA|ASIA)[0-9A-Z]{16}\b)"), 2),  # AWS access key id
    (re.compile(r"()(\bhf_[A-Za-z0-9]{30,})"), 2),  # Hugging Face
    (re.compile(r"()(\bsk-[A-Za-z0-9_-]{20,})"), 2),  # OpenAI and alike
    (re.compile(r"()(\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}))"), 2),  # GitHub
    (re.compile(r"()(\bglpat-[A-Za-z0-9_-]{20,})"), 2),  # GitLab
    (re.compile(r"()(\bxox[abprs]-[A-Za-z0-9-]{10,})"), 2),  # Slack
    (re.compile(r"()(\bAIza[0-9A-Za-z_-]{35})"), 2),  # Google API key
    (re.compile(r"()(\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})"), 2),  # a JWT
    (re.compile(r"()(-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----)"), 2),
]
MIN_REMEMBERED = 4  # a shorter value (a flag, a digit) is not looked for in lines: it would mask ordinary text

_remembered: Set[str] = set()


def words(key: str) -> List[str]:
    """'awsSecretAccessKey' -> ['aws', 'secret', 'access', 'key']; 'session-token' -> ['session', 'token']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(key))
    return [w for w in re.split(r"[\s_.\-]+", spaced.lower()) if w]


def secret_key(key: Any) -> bool:
    """Is a free mapping's key one whose value is a secret?"""
    ws = words(str(key))
    return bool(ws) and (bool(SECRET_WORDS.intersection(ws)) or ws[-1] in SECRET_LAST_WORDS or
                         "_".join(ws) in SECRET_NAMES)


def scrub_text(s: str) -> str:
    """A string with its credential-looking parts masked (not the remembered values: `text` does both)."""
    for pattern, group in PATTERNS:
        if group == 2:
            s = pattern.sub(lambda m: m.group(1) + MASK + (m.group(3) if m.re.groups >= 3 else ""), s)
    return s


def scrub(obj: Any, free: bool = True) -> Any:
    """A copy of a JSON-like value (or a dataclass) with secrets masked: values under secret keys of free mappings
    (`free`: a mapping here is one a user fills; a dataclass's field names are never judged, the mappings they hold
    are), and credential-looking strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: scrub(getattr(obj, f.name), free=True) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: MASK if free and secret_key(k) and v not in (None, "", {}, []) else scrub(v, free=True)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(x, free) for x in obj]
    if isinstance(obj, str):
        return scrub_text(obj)
    return obj


def scrub_config(cfg: Any) -> dict:
    """A RunConfig (a dataclass) as a plain dict with every secret masked: what the run may write or print."""
    return scrub(cfg, free=False)


def secret_values(obj: Any, free: bool = False) -> Set[str]:
    """The secret values `scrub` masks by key name, as strings (what `text` looks for in a line)."""
    out: Set[str] = set()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out |= secret_values(getattr(obj, f.name), free=True)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if free and secret_key(k) and not isinstance(v, (Mapping, list, tuple)) and v not in (None, ""):
                out.add(str(v))
            else:
                out |= secret_values(v, free=True)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            out |= secret_values(x, free)
    return out


def remember(cfg: Any) -> None:
    """Mask this config's secret values in every line `text` sees from now on (every log line of this process)."""
    _remembered.update(v for v in secret_values(cfg) if len(v) >= MIN_REMEMBERED)


def text(line: str) -> str:
    """A line to print or log, with every remembered secret value and every credential-looking string masked."""
    for value in _remembered:
        if value in line:
            line = line.replace(value, MASK)
    return scrub_text(line)
