"""The one settings object of drh-pacs.

Every process (``serve``, ``worker``, the CLI tools) builds one :class:`Settings` at start-up with
:func:`load_settings` and passes it down explicitly; nothing reads the environment anywhere else.

Precedence, highest first: environment variables ``DRH_<NAME>`` (upper case), then the optional
TOML file named by ``DRH_CONFIG`` (keys are the field names below, lower case, no prefix), then the
defaults written here. A value that cannot be parsed or is out of range, or a name that is no
setting (a misspelled ``DRH_`` variable or file key), fails loudly at start-up with the setting's
name, rather than half-working later.

The defaults are chosen to be safe on a hospital network: the HTTP API listens on loopback only
and always wants a token (generated and stored in the data directory when none is configured); the
embedded Redis wants a generated password; the DICOM SCP stores from any calling AE until
``allowed_calling_aes`` is set, but answers queries and retrieves (which hand out patient names and
IDs) only to the viewers declared in ``dicom_viewers``, unless ``dicom_query_open`` says otherwise;
and every size an outside peer chooses (PDUs, datasets, uploads, k) has a bound.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "DRH_"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "drh-pacs"


@dataclass(frozen=True)
class Settings:
    """All configuration. Each field's comment is its documentation (mirrored in the README)."""

    # -- storage -------------------------------------------------------------------------------
    # Where the embedded Redis keeps its data, the DICOM spool lives, and the API token is kept.
    data_dir: Path = field(default_factory=_default_data_dir)
    # Redis URL (redis://host:6379/0). Empty: `serve` starts an embedded Redis in data_dir.
    redis_url: str = ""
    # Celery broker URL. Empty: the same Redis as redis_url.
    broker_url: str = ""
    # Prefix of every Redis key we write, so one Redis can host several installations.
    redis_namespace: str = "drh"
    # Keep received DICOM files after indexing (needed to re-index with a new model locally;
    # without them `reindex` fetches the pixels from Orthanc, which must then be configured).
    keep_files: bool = True

    # -- DICOM SCP -------------------------------------------------------------------------------
    # Our AE title for storage, plain C-FIND and C-MOVE.
    ae_title: str = "DRHPACS"
    # Called AE title under which StudyInstanceUID / SOPInstanceUID (or, from viewer forms,
    # AccessionNumber with an optional PatientID) name the *reference* object.
    similar_ae_title: str = "SIMILAR"
    # Address the DICOM SCP binds (all interfaces: the PACS and viewers must reach it).
    dicom_host: str = "0.0.0.0"
    # DICOM SCP port.
    dicom_port: int = 11112
    # Calling AE titles allowed to store and echo (the PACS, modalities); empty list = any. Viewers
    # (dicom_viewers) are always allowed.
    allowed_calling_aes: list[str] = field(default_factory=list)
    # Peer IP addresses allowed to associate; empty list = any.
    allowed_addresses: list[str] = field(default_factory=list)
    # Viewers, "AE=host:port" comma separated: each may query (plain and similar C-FIND), retrieve
    # (C-MOVE, C-GET) and receive a C-MOVE. Other calling AEs may only store and echo.
    dicom_viewers: dict[str, str] = field(default_factory=dict)
    # Let any calling AE query and retrieve, not only dicom_viewers: anyone who reaches the port then
    # reads patient names and IDs. Only for a closed test network.
    dicom_query_open: bool = False
    # Concurrent established DICOM associations; more are refused (busy) rather than slowing everyone.
    max_associations: int = 16
    # Concurrent established associations from one IP address, so that one host never takes every slot.
    max_associations_per_address: int = 8
    # Seconds a new connection has to finish its TLS handshake and send its whole A-ASSOCIATE-RQ;
    # an idle or slow peer is disconnected then, without ever holding an association slot.
    dicom_request_timeout: float = 10.0
    # Seconds an association may stay silent, and the most one PDU may take to arrive, before the
    # association is aborted.
    dicom_network_timeout: float = 60.0
    # Largest PDU we receive (bytes), announced to the peer, which splits its messages to fit; a
    # larger one aborts the association. Bounds the memory one read takes.
    max_pdu_size: int = 262144
    # Largest dataset one C-STORE may carry (bytes); a larger one aborts the association. Datasets
    # are written to data_dir/tmp as they arrive, not held in memory, so this bounds disk, not RAM:
    # 2 GiB holds breast tomosynthesis and large enhanced CT/MR objects.
    max_dataset_size: int = 2 * 1024**3
    # What to do with non-image objects (SR, PR, KO...): "ignore" (accept, don't index) or "reject".
    non_image_policy: str = "ignore"
    # TLS for DICOM: server certificate and key (PEM); with tls_ca, peers must present a client cert.
    tls_cert: str = ""
    tls_key: str = ""
    # CA bundle (PEM) that client certificates must chain to; empty: no client certificates asked.
    tls_ca: str = ""
    # Other DICOM nodes, "AE=host:port" comma separated: source PACS (C-MOVE is forwarded to the
    # one that sent the study) and C-MOVE destinations that do not query.
    dicom_nodes: dict[str, str] = field(default_factory=dict)
    # Results returned by a similar-studies query when the query does not say.
    default_results: int = 10
    # The most results one similar query may ask for (at most 1000); a larger k is refused with a
    # reason.
    max_results: int = 100
    # Also start each similar answer's StudyDescription with its rank and score ("#01 0.938 CHEST
    # PA"): viewers and Orthanc hide or drop private elements and re-sort by their own columns.
    similar_rank_in_description: bool = True

    # -- studies and model ---------------------------------------------------------------------
    # A study is "stable" (its study-level code is computed) after this many seconds without a
    # new instance.
    study_stable_seconds: float = 60.0
    # A stable study whose instances are still queued for the model waits for them, at most this
    # many seconds after the latest reception among them (a message lost by the broker must not hold
    # its study back for ever); then it is pooled without them, and pooled again if they come.
    study_queue_wait_seconds: float = 3600.0
    # Model checkpoint of the main route. Empty: the chest radiograph model shipped inside the
    # package ("shipped:NAME" names another shipped model). Each model declares what it serves (its
    # route: modalities, body parts); `drh-pacs register` adds or replaces routes later.
    model_path: str = ""
    # More models a new installation serves from the start, comma separated (each its own route).
    extra_models: list[str] = field(default_factory=lambda: ["shipped:us-breast"])
    # Images no route takes: "general" hashes them with the general model (general_model_path,
    # declared general in answers), "none" stores them and counts them per modality as "no model".
    unrouted: str = "general"
    # The model for images no other route takes (when unrouted is "general").
    general_model_path: str = "shipped:general"
    # Single-frame images of these modalities are slices of a volume: a series is encoded once its
    # study is stable, from at most max_frames_per_series evenly spaced slices.
    volume_modalities: list[str] = field(default_factory=lambda: ["CT", "MR", "PT", "NM"])
    # Slices of a series, or frames of a multi-frame object, that are encoded (evenly spaced): the
    # work per series is bounded whatever its size.
    max_frames_per_series: int = 16
    # "auto" (cuda when present), "cpu" or "cuda:N".
    device: str = "auto"
    # Images per model forward pass in a worker.
    batch_size: int = 16

    # -- workers -------------------------------------------------------------------------------
    # Worker processes started by `serve` (0: none, run `drh-pacs worker` elsewhere).
    serve_workers: int = 1
    # Concurrency of one `drh-pacs worker` (processes).
    worker_concurrency: int = 1
    # Queues a `drh-pacs worker` consumes, comma separated.
    worker_queues: list[str] = field(default_factory=lambda: ["ingest", "study", "maintenance"])
    # Retries of a transient task error (exponential back-off, 5 s doubling up to 10 min) before
    # the instance goes to the failure ledger.
    task_max_retries: int = 8
    # Seconds before the broker hands the unacknowledged task of a vanished worker machine to
    # another worker; must exceed the longest task and study_stable_seconds.
    task_visibility_timeout: float = 3600.0
    # Lease (s) on instances a worker claims for one model batch; if it dies they are free again.
    batch_claim_seconds: float = 120.0
    # Base URL of the plugin's HTTP API, for workers on other machines to fetch spooled files
    # (empty: files are read from the shared path only).
    api_url: str = ""
    # Fault-injection hook for the fault tests only: a folder where a `<stage>.hold` file pauses
    # tasks at that stage. Leave empty in production.
    fault_hold_dir: str = ""

    # -- HTTP API ------------------------------------------------------------------------------
    # Address the HTTP API binds; loopback by default, put it behind TLS (deploy/) to open it.
    http_host: str = "127.0.0.1"
    # HTTP API port.
    http_port: int = 8080
    # Bearer token for the API. Empty: one is generated and kept in data_dir/api-token.
    api_token: str = ""
    # Let read-only endpoints (health, metrics, status) answer without the token.
    api_open_readonly: bool = False
    # Browser users who may log in to the page besides the API token: a file of `name:hash` lines
    # written by `drh-pacs users add NAME`. Empty: data_dir/http-users (no file: the token only).
    http_users_file: str = ""
    # Hours a browser session (the login cookie) stays valid: about a reading-room shift.
    session_hours: float = 12.0
    # Origins (scheme://host:port) whose web pages may call the API and DICOMweb from a browser
    # (CORS), e.g. an OHIF viewer served from another host; empty: same origin only.
    cors_origins: list[str] = field(default_factory=list)
    # Largest file POST /api/similar/upload accepts (bytes); it is streamed to data_dir/tmp, never
    # held whole in memory before decoding. One image: search big multi-frame objects by their UID.
    max_upload_size: int = 256 * 1024**2
    # Uploads decoded and hashed at once; more are refused (503, Retry-After) so memory stays bounded.
    max_concurrent_uploads: int = 2

    # -- similar-cases page and DICOMweb -----------------------------------------------------------
    # WADO-RS root of the PACS (https://pacs.example.org/dicom-web): each DICOMweb answer's
    # RetrieveURL points there. Empty: answers carry no RetrieveURL.
    pacs_wado_root: str = ""
    # The page's "open in viewer" links, NAME=URL comma separated (a TOML table in the file); the URL
    # may use {StudyInstanceUID}, {AccessionNumber}, {PatientID} and {StudyDate} (README, examples).
    viewer_urls: dict[str, str] = field(default_factory=dict)
    # AE titles (declared in dicom_viewers or dicom_nodes) the page offers to send a study to with a
    # C-MOVE; empty: no send button.
    move_destinations: list[str] = field(default_factory=list)
    # Disk cache of rendered thumbnails and frames in data_dir/cache/rendered, in MiB; the least
    # recently used files go first.
    render_cache_mb: int = 256

    # -- Orthanc ---------------------------------------------------------------------------------
    # Orthanc REST API (http://host:8042) for `backfill orthanc`, fetching pixels to re-index, and the
    # page's thumbnails of studies drh-pacs does not hold.
    orthanc_url: str = ""
    # Orthanc REST credentials.
    orthanc_user: str = ""
    orthanc_password: str = ""
    # Seconds between the reconciliations `serve` runs against Orthanc (its /changes log): studies
    # Orthanc holds that drh-pacs lacks are indexed. 0: never. Needs orthanc_url.
    orthanc_reconcile_seconds: float = 900.0

    # -- logging ---------------------------------------------------------------------------------
    # DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"

    # Derived paths ----------------------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def tmp_dir(self) -> Path:
        """Received datasets and uploads in transit: on the data disk (``/tmp`` may be RAM)."""
        return self.data_dir / "tmp"

    def resolved_api_token(self) -> str:
        """The configured token, else the one kept in data_dir (created on first use, mode 0600)."""
        if self.api_token:
            return self.api_token
        return _kept_secret(self.data_dir / "api-token")

    def embedded_redis_password(self) -> str:
        """The embedded Redis's password, kept like the API token (data_dir/redis-password, 0600)."""
        return _kept_secret(self.data_dir / "redis-password")

    def may_query(self, calling_ae: str) -> bool:
        """Whether a calling AE may query and retrieve (patient data leaves through these)."""
        return self.dicom_query_open or calling_ae.strip() in self.dicom_viewers

    def move_destination(self, ae_title: str) -> str | None:
        """``host:port`` of a C-MOVE destination: a declared viewer or another node."""
        title = ae_title.strip()
        return self.dicom_viewers.get(title) or self.dicom_nodes.get(title)

    @property
    def users_path(self) -> Path:
        """The file of browser users (``http_users_file``, else data_dir/http-users)."""
        return Path(self.http_users_file).expanduser() if self.http_users_file else self.data_dir / "http-users"

    def resolved_session_secret(self) -> bytes:
        """The key that signs browser sessions, kept in data_dir/session-secret (mode 0600) so that
        sessions survive a restart; deleting the file logs every browser out."""
        path = self.data_dir / "session-secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process created it first: use theirs
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(32) + "\n")
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise SettingsError(f"{path} holds no usable session secret: delete it to make a new one")
        return secret.encode()

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _kept_secret(path: Path) -> str:
    """A secret kept in a file readable by its owner only, generated on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile: use theirs
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret


def _parse(name: str, kind: Any, raw: Any, source: str = "") -> Any:
    """Turn an environment string (or a TOML value) into the field's type.

    ``source`` names where the value came from, for the error: the environment variable unless said.
    """
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(str(raw)).expanduser()
        if kind == list[str]:
            if isinstance(raw, list):
                return [str(x).strip() for x in raw if str(x).strip()]
            return [x.strip() for x in str(raw).split(",") if x.strip()]
        if kind == dict[str, str]:
            if isinstance(raw, dict):
                return {str(k): str(v) for k, v in raw.items()}
            out: dict[str, str] = {}
            for item in str(raw).split(","):
                if not item.strip():
                    continue
                key, sep, value = item.partition("=")
                if not sep or not key.strip() or not value.strip():
                    raise ValueError(f"expected NAME=VALUE (AE=host:port for nodes), got {item!r}")
                out[key.strip()] = value.strip()
            return out
        return str(raw)
    except ValueError as exc:
        raise SettingsError(f"setting {name} ({source or ENV_PREFIX + name.upper()}): {exc}") from exc


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from environment, then the DRH_CONFIG file, then defaults.

    ``overrides`` (from command-line flags) win over everything.
    """
    env = dict(os.environ if env is None else env)
    file_values: dict[str, Any] = {}
    config_path = env.get(ENV_PREFIX + "CONFIG", "")
    if config_path:
        try:
            with open(config_path, "rb") as fh:
                file_values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read DRH_CONFIG={config_path}: {exc}") from exc
    hints = get_type_hints(Settings)
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(file_values) - known
    if unknown:
        raise SettingsError(f"unknown settings in {config_path}: {_with_suggestions(unknown, known)}")
    # A misspelled variable would otherwise leave its setting at the default without a word.
    unknown_env = {k for k in env if k.startswith(ENV_PREFIX) and not KUBERNETES_SERVICE.match(k)}
    unknown_env -= {ENV_PREFIX + n.upper() for n in known} | NOT_SETTINGS
    if unknown_env:
        names = {ENV_PREFIX + n.upper() for n in known}
        raise SettingsError(f"unknown environment variables: {_with_suggestions(unknown_env, names)}")
    values: dict[str, Any] = {}
    for name in known:
        env_key = ENV_PREFIX + name.upper()
        if name in overrides and overrides[name] is not None:
            values[name] = overrides[name]
        elif env_key in env:
            values[name] = _parse(name, hints[name], env[env_key])
        elif name in file_values:
            values[name] = _parse(name, hints[name], file_values[name], source=f"in {config_path}")
    settings = Settings(**values)
    _validate(settings)
    return settings


# DRH_* variables that are not settings: the file of settings, and the tests' screenshot switch.
NOT_SETTINGS = frozenset({ENV_PREFIX + "CONFIG", ENV_PREFIX + "UPDATE_SCREENSHOT"})

# What Kubernetes puts in every pod's environment for a Service named drh-pacs (DRH_PACS_SERVICE_HOST,
# DRH_PACS_PORT_11112_TCP...): not settings, and not to be refused.
KUBERNETES_SERVICE = re.compile(r"^DRH_PACS_(SERVICE_|PORT$|PORT_)")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _with_suggestions(unknown: set[str], known: set[str]) -> str:
    """The unknown names, each with the known one it most resembles ("http_prot (http_port?)")."""
    import difflib

    shown = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        shown.append(f"{name} ({close[0]}?)" if close else name)
    return ", ".join(shown)


def _validate(s: Settings) -> None:
    if s.log_level.upper() not in LOG_LEVELS:
        raise SettingsError(f"setting log_level must be one of {', '.join(LOG_LEVELS)}, got {s.log_level!r}")
    for name in ("dicom_port", "http_port"):
        if not 0 < getattr(s, name) < 65536:
            raise SettingsError(f"setting {name} must be a TCP port, 1 to 65535, got {getattr(s, name)}")
    if s.non_image_policy not in {"ignore", "reject"}:
        raise SettingsError("setting non_image_policy must be 'ignore' or 'reject'")
    if s.max_frames_per_series < 1:
        raise SettingsError("setting max_frames_per_series must be >= 1")
    if s.unrouted not in ("general", "none"):
        raise SettingsError(f"setting unrouted must be 'general' or 'none', got {s.unrouted!r}")
    for title in (s.ae_title, s.similar_ae_title):
        if not 0 < len(title) <= 16:
            raise SettingsError(f"AE title {title!r} must be 1 to 16 characters")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingsError("settings tls_cert and tls_key go together")
    if not (s.device == "auto" or s.device == "cpu" or s.device.startswith("cuda")):
        raise SettingsError(f"setting device must be auto, cpu or cuda:N, got {s.device!r}")
    if s.study_stable_seconds < 0:
        raise SettingsError("setting study_stable_seconds must be >= 0")
    if s.study_queue_wait_seconds < 0:
        raise SettingsError("setting study_queue_wait_seconds must be >= 0")
    if s.session_hours <= 0:
        raise SettingsError("setting session_hours must be > 0")
    if s.render_cache_mb < 0:
        raise SettingsError("setting render_cache_mb must be >= 0")
    for origin in s.cors_origins:
        if origin != origin.rstrip("/") or not re.match(r"^https?://[^/\s]+$", origin):
            raise SettingsError(f"setting cors_origins: {origin!r} is not scheme://host[:port]")
    for ae in s.move_destinations:
        if ae not in s.dicom_viewers and ae not in s.dicom_nodes:
            raise SettingsError(f"setting move_destinations: {ae!r} is not a declared viewer or node")
    for name, template in s.viewer_urls.items():
        # The page writes these into links: only schemes a viewer uses, never javascript: or data:.
        if not re.match(r"^(https?://|weasis://|/)", template):
            raise SettingsError(f"setting viewer_urls: {name} must start with http(s)://, weasis:// or /")
        unknown = set(re.findall(r"\{(\w*)\}", template)) - set(VIEWER_URL_FIELDS)
        if unknown:
            raise SettingsError(f"setting viewer_urls: {name} uses unknown field(s) {sorted(unknown)}")
    if s.orthanc_reconcile_seconds < 0:
        raise SettingsError("setting orthanc_reconcile_seconds must be >= 0 (0: never)")

    for name in ("dicom_viewers", "dicom_nodes"):
        for title, address in getattr(s, name).items():
            if not 0 < len(title) <= 16:
                raise SettingsError(f"setting {name}: AE title {title!r} must be 1 to 16 characters")
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise SettingsError(f"setting {name}: {title}={address!r} is not host:port")
    for title in set(s.dicom_viewers) & set(s.dicom_nodes):
        if s.dicom_viewers[title] != s.dicom_nodes[title]:
            raise SettingsError(f"AE {title} has two addresses: in dicom_viewers and in dicom_nodes")
    positive = ("max_associations", "max_associations_per_address", "max_results", "default_results")
    positive += ("max_dataset_size", "max_upload_size", "max_concurrent_uploads", "batch_size")
    positive += ("worker_concurrency",)
    for name in positive:
        if getattr(s, name) < 1:
            raise SettingsError(f"setting {name} must be >= 1")
    for name in ("serve_workers", "task_max_retries"):
        if getattr(s, name) < 0:
            raise SettingsError(f"setting {name} must be >= 0")
    for name in ("task_visibility_timeout", "batch_claim_seconds"):
        if getattr(s, name) <= 0:
            raise SettingsError(f"setting {name} must be > 0")
    if s.max_results > 1000:  # plugin.search.query.MAX_RESULTS, the bound of every query
        raise SettingsError("setting max_results must be <= 1000")
    if s.default_results > s.max_results:
        raise SettingsError("setting default_results must not exceed max_results")
    if not 4096 <= s.max_pdu_size <= 2**31:
        raise SettingsError("setting max_pdu_size must be between 4096 and 2**31 bytes")
    for name in ("dicom_request_timeout", "dicom_network_timeout"):
        if getattr(s, name) <= 0:
            raise SettingsError(f"setting {name} must be > 0")


# The study fields a viewer_urls template may use (the page fills them in, URL-encoded).
VIEWER_URL_FIELDS = ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate")


def configured_models(settings: Settings) -> list[str]:
    """The checkpoints an installation starts with: ``model_path``, ``extra_models``, and
    ``general_model_path`` when ``unrouted`` is general (the first of a route wins)."""
    paths = [settings.model_path, *settings.extra_models]
    if settings.unrouted == "general":
        paths.append(settings.general_model_path)
    return list(dict.fromkeys(paths))


def settings_table() -> str:
    """The README's settings table, read from the comments above each field of Settings.

    ``python -m plugin.core.settings`` prints it, so the documentation is written once, here.
    """
    import inspect

    rows: list[str] = []
    comment: list[str] = []
    for line in inspect.getsource(Settings).splitlines():
        text = line.strip()
        if text.startswith("# --"):
            comment = []
        elif text.startswith("#"):
            comment.append(text[1:].strip())
        elif match := re.match(r"(\w+): [^=]+= ?(.*)$", text):
            name = match.group(1)
            default = getattr(Settings(), name)
            if isinstance(default, list):
                shown = ",".join(default) or "(empty)"
            elif isinstance(default, dict):
                shown = ",".join(f"{k}={v}" for k, v in default.items()) or "(empty)"
            elif name == "data_dir":
                shown = "~/.local/share/drh-pacs"
            else:
                shown = str(default) if str(default) != "" else "(empty)"
            rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{shown}` | {' '.join(comment)} |")
            comment = []
        elif not text or text.startswith(("@", "def ", '"""')):
            comment = []
    return "\n".join(["| variable | default | meaning |", "| --- | --- | --- |", *rows])


if __name__ == "__main__":
    print(settings_table())
