"""DICOMweb and DIMSE transfer: studies read from a PACS, the SR and SEG of ``predict --dicom-out`` stored back.

Reading (``covidctnet predict|slice-scores|preprocess dicomweb+http://HOST:PORT/dicom-web/studies/<StudyUID>``, also
``https``, ``…/series/<SeriesUID>``, and a server's base URL with ``--query FIELD=VALUE`` for every study a QIDO-RS
search finds): the study's CT series are retrieved with WADO-RS (dicomweb-client) in their stored transfer syntax into a
temporary folder, which the usual pipeline reads (series selection, scout and dose-report skipping, checks) and which
is deleted afterwards, unless ``--keep-download DIR``. Series of other modalities (an SR or SEG stored by an earlier
run, a dose report) are not downloaded. The study id is the Study Instance UID (the Series Instance UID for a series
URL), never a patient tag.

Storing (``predict --dicom-out DIR --store-to …``): ``dicomweb+http(s)://HOST:PORT/dicom-web`` sends the study's SEG
and SR in one STOW-RS request and then looks them up with QIDO-RS (a server may answer a STOW with success and still
drop an instance, as Orthanc does for one its filter refuses); ``dimse://AET@HOST:PORT`` sends them with C-STORE
(pynetdicom), calling AE title ``--ae-title``. What was stored is returned as SOP Instance UIDs only.

Credentials: a bearer token from ``COVIDCTNET_DICOMWEB_TOKEN``, or HTTP basic from ``COVIDCTNET_DICOMWEB_USER`` and
``COVIDCTNET_DICOMWEB_PASSWORD``, or the host's entry in ``~/.netrc`` (``NETRC`` names another file). None of them is
ever echoed or logged, and a URL that holds credentials is refused. TLS certificates are verified
(``REQUESTS_CA_BUNDLE`` names a hospital CA bundle); ``--insecure`` switches that off with a warning. Proxy variables
of the environment are not used: the only host contacted is the one in the URL. Every request has a timeout
(``--timeout``) and is tried 3 times with back-off when the server cannot be reached, times out, cuts a transfer
short or answers 408/429/5xx; 401, 403 and 404 fail at once.

Errors are one line naming the URL (never credentials or query values) and the problem: :class:`TransferError` for
the network and the server, :class:`StoreError` when storing failed, which lists the SOP Instance UIDs the server did
keep, if any. The loggers of requests, urllib3, dicomweb-client and pynetdicom are held at WARNING while a transfer
runs: at DEBUG they print request URLs, whose QIDO filters may hold a patient ID.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from covidctnet.core.errors import ConfigError, InputError, NotCTError
from covidctnet.core.progress import progress_task

__all__ = [
    "TransferConfig",
    "RemoteStudy",
    "RemoteInput",
    "remote_inputs",
    "transfer_config_of",
    "TransferError",
    "StoreError",
    "TOKEN_ENV",
    "USER_ENV",
    "PASSWORD_ENV",
    "TRIES",
    "is_dicomweb_url",
    "find_studies",
    "retrieve",
    "retrieved",
    "check_store_target",
    "store",
]

logger = logging.getLogger(__name__)

TOKEN_ENV = "COVIDCTNET_DICOMWEB_TOKEN"
USER_ENV = "COVIDCTNET_DICOMWEB_USER"
PASSWORD_ENV = "COVIDCTNET_DICOMWEB_PASSWORD"
TRIES = 3
"""Tries of every request (and of a whole series download cut short)."""
BACKOFF_S = 0.5
"""Wait before the second try; doubled before each further one."""
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_URL = re.compile(r"^dicomweb\+(https?):/{1,2}(.*)$", re.IGNORECASE)  # one slash: a URL that went through Path()
_DIMSE = re.compile(r"^dimse://(?P<aet>[^@/]{1,16})@(?P<host>[^:/]+):(?P<port>\d+)/?$")
_QUIET = ("urllib3", "requests", "dicomweb_client", "pynetdicom")
_CT = "CT"
_T = TypeVar("_T")


class TransferError(InputError):
    """A DICOMweb or DIMSE server could not be reached, refused the request, or cut the transfer."""


class StoreError(TransferError):
    """Storing the SR and SEG failed, or the server kept only some of them (named in the message)."""


@dataclass(frozen=True)
class TransferConfig:
    """How studies are read from and written to a PACS (the ``predict``/``slice-scores``/``preprocess`` options).

    Attributes:
        timeout: seconds to wait for a connection and for each answer (and each DIMSE message).
        insecure: do not verify TLS certificates (a warning says so).
        keep_download: keep each retrieved study in ``DIR/<study_id>/`` instead of a deleted temporary folder.
        query: QIDO-RS filters ``FIELD=VALUE`` applied to a server's base URL: one study per match.
        store_to: ``dicomweb+http(s)://HOST:PORT/PREFIX`` (STOW-RS) or ``dimse://AET@HOST:PORT`` (C-STORE): where
            ``predict`` stores each study's SR and SEG; None: nowhere.
        ae_title: the calling AE title of C-STORE.
    """

    timeout: float = 30.0
    insecure: bool = False
    keep_download: str | None = None
    query: tuple[str, ...] = ()
    store_to: str | None = None
    ae_title: str = "COVIDCTNET"

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"'timeout' must be > 0 seconds, not {self.timeout}")
        if not 0 < len(self.ae_title) <= 16 or not self.ae_title.isascii() or "\\" in self.ae_title:
            raise ConfigError(f"'ae_title' must be 1 to 16 ASCII characters, not {self.ae_title!r}")
        for q in self.query:
            if "=" not in q or not q.split("=", 1)[0].strip():
                raise ConfigError(f"--query takes FIELD=VALUE (a QIDO-RS attribute such as PatientID or StudyDate), "
                                  f"not {q.split('=', 1)[0]!r}")


@dataclass(frozen=True)
class _Server:
    """A DICOMweb service: ``base`` is ``http(s)://host[:port]/prefix`` without credentials or query."""

    base: str
    host: str

    @property
    def display(self) -> str:
        return "dicomweb+" + self.base


@dataclass(frozen=True)
class RemoteStudy:
    """One study (or one series of it) on a DICOMweb server, with the settings to retrieve it (picklable, so that
    worker processes and Dask workers retrieve their own studies).

    Attributes:
        base: ``http(s)://host[:port]/prefix`` of the DICOMweb service (no credentials).
        host: the host name, for the credential lookup.
        study_uid: Study Instance UID.
        series_uid: Series Instance UID when the URL named one series.
        cfg: the transfer settings.
    """

    base: str
    host: str
    study_uid: str
    series_uid: str | None
    cfg: TransferConfig

    @property
    def study_id(self) -> str:
        """The batch's study id: the Series Instance UID for a series URL, else the Study Instance UID."""
        return self.series_uid or self.study_uid

    @property
    def display(self) -> str:
        """The study's URL as given, credentials and query left out (for messages and the manifest)."""
        url = f"dicomweb+{self.base}/studies/{self.study_uid}"
        return url + (f"/series/{self.series_uid}" if self.series_uid else "")


@dataclass(frozen=True)
class RemoteInput:
    """A ``dicomweb+`` URL among a command's inputs, with the transfer settings it is to be read with (a path-like:
    it goes through the batch functions' ``inputs`` as a path would, to :func:`covidctnet.io.batch.discover_studies`).
    """

    url: str
    cfg: TransferConfig

    def __fspath__(self) -> str:
        return self.url


def remote_inputs(inputs: Sequence[str | os.PathLike], cfg: TransferConfig) -> list[str | os.PathLike]:
    """The inputs with each ``dicomweb+`` URL wrapped with ``cfg`` (:class:`RemoteInput`); paths unchanged.

    Raises:
        ConfigError: ``--query`` given but no input is a DICOMweb URL; a malformed URL.
    """
    out: list[str | os.PathLike] = []
    for item in inputs:
        if is_dicomweb_url(item):
            _parse(os.fspath(item))  # a malformed URL fails here, before any study runs
            _require("dicomweb_client", "reading from DICOMweb")
            out.append(RemoteInput(os.fspath(item), cfg))
        else:
            out.append(item)
    if cfg.query and not any(isinstance(i, RemoteInput) for i in out):
        raise ConfigError("--query searches a DICOMweb server: give its URL (dicomweb+http://HOST:PORT/dicom-web)")
    return out


def transfer_config_of(item: Any) -> TransferConfig:
    """The transfer settings an input carries (:class:`RemoteInput`), else the defaults."""
    return item.cfg if isinstance(item, RemoteInput) else TransferConfig()


def _require(module: str, what: str) -> None:
    """A clear error, before any study runs, when the optional ``pacs`` extra is missing."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs {module.replace('_', '-')}: pip install 'covidctnet[pacs]'")


def is_dicomweb_url(value: Any) -> bool:
    """Whether an input is a ``dicomweb+http(s)://`` URL (also after ``pathlib.Path`` folded its double slash)."""
    return isinstance(value, (str, os.PathLike)) and _URL.match(os.fspath(value)) is not None


def _parse(url: str) -> tuple[_Server, str | None, str | None]:
    """``(server, study UID, series UID)`` of a ``dicomweb+`` URL.

    Raises:
        ConfigError: not such a URL, credentials in it, or a path with ``studies/`` but no UID.
    """
    match = _URL.match(os.fspath(url))
    if match is None:
        raise ConfigError(f"{url}: not a dicomweb+http(s):// URL")
    parts = urlsplit(f"{match.group(1).lower()}://{match.group(2)}")
    if parts.username is not None or parts.password is not None:
        # never echo it back: the message names the host only
        raise ConfigError(f"dicomweb+{parts.scheme}://{parts.hostname}: credentials in the URL are refused (they "
                          f"show in process lists and shell history); use {TOKEN_ENV}, {USER_ENV} and {PASSWORD_ENV}, "
                          "or ~/.netrc")
    if not parts.hostname:
        raise ConfigError(f"{url}: no host in the URL")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"dicomweb+{parts.scheme}://{parts.hostname}: bad port") from None
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    path = parts.path.rstrip("/")
    study = series = None
    found = re.match(r"^(?P<prefix>.*?)/studies(?:/(?P<study>[^/]+)(?:/series(?:/(?P<series>[^/]+))?)?)?$", path)
    if found:
        path, study, series = found.group("prefix"), found.group("study"), found.group("series")
        if study is None or (series is None and found.group(0).endswith("/series")):
            raise ConfigError(f"dicomweb+{parts.scheme}://{netloc}{parts.path}: give .../studies/<StudyInstanceUID>"
                              "[/series/<SeriesInstanceUID>], or the server's base URL with --query")
    return _Server(f"{parts.scheme}://{netloc}{path}", parts.hostname), study, series


def _credentials(host: str) -> Any:
    """The requests auth for ``host``: bearer token, basic from the environment, ``~/.netrc``, or None."""
    import requests

    token = os.environ.get(TOKEN_ENV)
    if token:
        return _Bearer(token)
    user = os.environ.get(USER_ENV)
    if user:
        return requests.auth.HTTPBasicAuth(user, os.environ.get(PASSWORD_ENV, ""))
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if path.is_file():
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError) as err:  # the parser's message may quote a token: left out
            raise ConfigError(f"{path}: not a readable .netrc file (line {getattr(err, 'lineno', '?')})") from None
        if entry is not None:
            return requests.auth.HTTPBasicAuth(entry[0], entry[2] or "")
    return None


class _Bearer:
    """``Authorization: Bearer <token>`` (a requests auth; its ``repr`` hides the token)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_Bearer(<hidden>)"


def _session(host: str, cfg: TransferConfig) -> Any:
    import requests

    session = requests.Session()
    session.trust_env = False  # no proxy variables (the URL's host is the only one contacted), no implicit netrc
    session.auth = _credentials(host)
    if cfg.insecure:
        session.verify = False
    elif os.environ.get("REQUESTS_CA_BUNDLE"):
        session.verify = os.environ["REQUESTS_CA_BUNDLE"]
    return session


_warned_insecure = False


def _client(server: _Server, cfg: TransferConfig) -> Any:
    from dicomweb_client import DICOMwebClient

    global _warned_insecure
    if cfg.insecure and not _warned_insecure:
        logger.warning("TLS certificates are not verified (--insecure): use this only for a server you trust")
        _warned_insecure = True
    client = DICOMwebClient(server.base, session=_session(server.host, cfg), timeout=cfg.timeout)
    client.set_http_retry_params(retry=False)  # tried here, 3 times for every kind of failure (_call)
    return client


@contextmanager
def _quiet() -> Iterator[None]:
    """The HTTP and DICOM libraries' loggers at WARNING at least: at DEBUG they print URLs with query values."""
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unverified HTTPS request")  # said once, by _client
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _Cut(Exception):
    """Fewer instances arrived than the server announced, or one arrived incomplete."""

    def __init__(self, got: int, expected: int, incomplete: bool = False) -> None:
        super().__init__(f"transfer cut short: instance {got + 1} of {expected} arrived incomplete" if incomplete
                         else f"transfer cut short: {got} of {expected} instances arrived")


# pydicom's warnings for data that ends before the element or sequence it was in (a part cut off): errors here
_TRUNCATED = r"(?s).*(End of file reached|Expected .* bytes|truncated|premature).*"


def _problem(err: BaseException, timeout: float) -> tuple[str, bool]:
    """``(what went wrong in words, whether another try may help)``; never the exception's own text, which may hold
    a URL with query values."""
    import requests

    if isinstance(err, _Cut):
        return str(err), True
    if isinstance(err, requests.exceptions.SSLError):
        return "TLS certificate not verified (a hospital CA: REQUESTS_CA_BUNDLE; --insecure only for a server you " \
               "trust)", False
    if isinstance(err, requests.exceptions.Timeout):
        return f"no answer within {timeout:g} s (--timeout)", True
    if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:
        status, reason = err.response.status_code, err.response.reason or ""
        if status == 401:
            return (f"401 Unauthorized: credentials missing or wrong ({TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}, "
                    "or ~/.netrc)"), False
        if status == 403:
            return "403 Forbidden: these credentials may not do this", False
        return f"the server answered {status} {reason}".rstrip(), status in RETRY_STATUS
    if isinstance(err, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return "transfer cut short by the server", True
    if isinstance(err, requests.exceptions.ConnectionError):
        for cause in _causes(err):
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused (is the server running, is the port right?)", True
            if isinstance(cause, socket.gaierror):
                return "host name not found", False
        return "connection failed or cut short", True
    if isinstance(err, ValueError):  # dicomweb-client: a malformed multipart answer
        return "the server's answer is not valid DICOMweb", False
    raise err


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception behind it (requests wraps urllib3's, which wraps the socket's)."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        linked = [e.__cause__, e.__context__, getattr(e, "reason", None), *(e.args or ())]
        todo.extend(x for x in linked if isinstance(x, BaseException))


def _call(where: str, cfg: TransferConfig, fn: Callable[[], _T]) -> _T:
    """``fn()``, tried :data:`TRIES` times with back-off where another try may help.

    Raises:
        TransferError: ``<where>: <problem>``.
    """
    for attempt in range(TRIES):
        try:
            with _quiet():
                return fn()
        except Exception as err:  # noqa: BLE001 - sorted by _problem, which re-raises what it does not know
            if isinstance(err, InputError):
                raise
            problem, again = _problem(err, cfg.timeout)
            if not again or attempt == TRIES - 1:
                raise TransferError(f"{where}: {problem}" + (f" ({TRIES} tries)" if again else "")) from None
            logger.info("%s: %s; trying again", where, problem)
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def find_studies(url: str, cfg: TransferConfig = TransferConfig()) -> list[RemoteStudy]:
    """The studies an input URL stands for: the one it names, or every study a QIDO-RS search with ``cfg.query``
    finds on a server's base URL (no network for a study or series URL: its problems come at :func:`retrieve`).

    Raises:
        ConfigError: a malformed URL, ``--query`` with a study URL, or a base URL without ``--query``.
        TransferError: the search failed; InputError: no study matches.
    """
    server, study, series = _parse(url)
    if study is not None:
        if cfg.query:
            raise ConfigError(f"{server.display}/studies/{study}: --query searches a server: give its base URL "
                              f"({server.display}), not a study's")
        return [RemoteStudy(server.base, server.host, study, series, cfg)]
    if not cfg.query:
        raise ConfigError(f"{server.display}: give .../studies/<StudyInstanceUID>, or --query FIELD=VALUE to search "
                          "this server's studies")
    filters = dict(q.split("=", 1) for q in cfg.query)
    client = _client(server, cfg)
    found = _call(server.display, cfg, lambda: client.search_for_studies(search_filters=filters, get_remaining=True))
    uids = sorted({u for u in (_value(item, "0020000D") for item in found) if u})
    if not uids:  # the filter values are not repeated: they may be a patient's ID or name
        raise InputError(f"{server.display}: no study matches the --query filters ({', '.join(filters)})")
    return [RemoteStudy(server.base, server.host, uid, None, cfg) for uid in uids]


def retrieve(study: RemoteStudy, folder: str | os.PathLike) -> int:
    """Download the study's CT series (or the named series) into ``folder``, one file per instance.

    Instances come in the transfer syntax they are stored in, as the server streams them; a series whose download
    ends early (fewer instances than the server announced, or a cut connection) is downloaded again, 3 tries in all.

    Returns:
        The number of instances written.

    Raises:
        TransferError: the server is unreachable, refused the request (401/403), or cut every try short.
        InputError: no such study or series on the server; NotCTError: it holds no CT series.
    """
    server = _Server(study.base, study.host)
    cfg, where = study.cfg, study.display
    client = _client(server, cfg)
    filters = {"SeriesInstanceUID": study.series_uid} if study.series_uid else None
    series = _call(where, cfg, lambda: client.search_for_series(
        study.study_uid, search_filters=filters, fields=["Modality", "NumberOfSeriesRelatedInstances"]))
    if not series:
        raise InputError(f"{where}: no such {'series' if study.series_uid else 'study'} on the server")
    ct = [s for s in series if _value(s, "00080060") == _CT]
    if not ct:
        kinds = ", ".join(sorted({str(_value(s, "00080060") or "?") for s in series}))
        raise NotCTError(f"{where}: no CT series in this {'series' if study.series_uid else 'study'} "
                         f"(modalities: {kinds})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = []
    for s in ct:
        uid = _value(s, "0020000E")
        count = _value(s, "00201209")
        if count is None:  # the series' instance count is optional in QIDO answers: count the instances
            count = len(_call(where, cfg, lambda u=uid: client.search_for_instances(
                study.study_uid, u, fields=["SOPInstanceUID"], get_remaining=True)))
        plan.append((uid, int(count)))
    written = 0
    with progress_task(sum(n for _, n in plan), f"retrieve {study.study_id[-12:]}", "instances") as bar:
        for k, (uid, expected) in enumerate(plan):
            def download(k: int = k, uid: str = uid, expected: int = expected) -> int:
                for old in folder.glob(f"{k:03d}-*.dcm"):  # an earlier try's files
                    old.unlink()
                n = 0
                # "*": the stored transfer syntax, no transcoding by the server (the reader decodes JPEG and RLE)
                instances = client.iter_series(study.study_uid, uid, media_types=(("application/dicom", "*"),))
                with warnings.catch_warnings():
                    warnings.filterwarnings("error", message=_TRUNCATED)
                    while True:
                        try:
                            ds = next(instances, None)
                            if ds is None:
                                break
                            ds.save_as(folder / f"{k:03d}-{n:05d}.dcm", enforce_file_format=True)
                        except (Warning, AttributeError, KeyError, ValueError, EOFError) as err:
                            # a part cut off inside: pydicom read what there was; its file would be wrong
                            if isinstance(err, ValueError) and "multipart" in str(err).lower():
                                raise
                            bar.advance(-n)
                            raise _Cut(n, expected, incomplete=True) from None
                        n += 1
                        bar.advance()
                if n < expected:
                    bar.advance(-n)
                    raise _Cut(n, expected)
                return n

            written += _call(where, cfg, download)
    logger.info("%s: %d instances retrieved", study.study_id, written)
    return written


@contextmanager
def retrieved(study: RemoteStudy) -> Iterator[Path]:
    """The study downloaded (:func:`retrieve`) into a temporary folder, deleted on leaving, or into
    ``keep_download/<study_id>/``, which is kept (and removed again if the download fails: no partial copy)."""
    keep = study.cfg.keep_download
    if keep:
        folder = Path(keep) / study.study_id
        if folder.exists():
            shutil.rmtree(folder)
    else:
        folder = Path(tempfile.mkdtemp(prefix="covidctnet-dicomweb-"))
    try:
        retrieve(study, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def check_store_target(target: str) -> str:
    """The target as shown in messages and the report (no credentials).

    Raises:
        ConfigError: neither ``dicomweb+http(s)://HOST:PORT/PREFIX`` nor ``dimse://AET@HOST:PORT``.
    """
    match = _DIMSE.match(target)
    if match:
        _require("pynetdicom", "--store-to dimse://")
        return f"dimse://{match.group('aet')}@{match.group('host')}:{match.group('port')}"
    if target.startswith("dimse:"):
        raise ConfigError(f"--store-to {target}: give dimse://AET@HOST:PORT (AE title of at most 16 characters)")
    if not is_dicomweb_url(target):
        raise ConfigError(f"--store-to {target}: give dicomweb+http(s)://HOST:PORT/PREFIX or dimse://AET@HOST:PORT")
    server, study, _ = _parse(target)
    if study is not None:
        raise ConfigError(f"--store-to {server.display}/studies/{study}: give the server's base URL "
                          f"({server.display}): the SR and SEG name their study themselves")
    _require("dicomweb_client", "--store-to dicomweb+")
    return server.display


def store(files: Sequence[str | os.PathLike], cfg: TransferConfig) -> dict[str, Any]:
    """Store the files (a study's SEG, then its SR) where ``cfg.store_to`` says.

    Returns:
        ``{"to": target without credentials, "sop_instance_uids": [...]}``: every file was stored.

    Raises:
        StoreError: the server refused some or all of them (the message names the SOP Instance UIDs it kept), or
            could not be reached (:class:`TransferError` text).
    """
    import pydicom

    if cfg.store_to is None:
        raise ConfigError("no --store-to target")
    shown = check_store_target(cfg.store_to)
    datasets = [pydicom.dcmread(f) for f in files]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if shown.startswith("dimse://"):
        kept = _store_dimse(datasets, cfg, shown)
    else:
        kept = _store_stow(datasets, cfg)
    missing = [u for u in uids if u not in kept]
    if missing:
        kept_text = " ".join(u for u in uids if u in kept) or "none"
        raise StoreError(f"{shown}: the server did not store {len(missing)} of {len(uids)} instances "
                         f"({' '.join(missing)}); stored: {kept_text}")
    logger.info("stored %d instances to %s", len(uids), shown)
    return {"to": shown, "sop_instance_uids": uids}


def _store_stow(datasets: list[Any], cfg: TransferConfig) -> set[str]:
    """STOW-RS, then QIDO-RS of each instance: the UIDs the server holds afterwards."""
    import pydicom
    import requests

    server, _, _ = _parse(cfg.store_to or "")
    client = _client(server, cfg)

    def post() -> Any:
        try:
            return client.store_instances(datasets)
        except requests.exceptions.HTTPError as err:
            # 202/409 with a body: some stored, some failed (DICOM PS3.18 10.5.3); the body says which
            body = err.response.content if err.response is not None else b""
            if err.response is not None and err.response.status_code in (202, 409) and body:
                try:
                    return pydicom.Dataset.from_json(body)
                except (ValueError, TypeError):
                    pass
            raise

    try:
        answer = _call(server.display, cfg, post)
    except TransferError as err:
        raise StoreError(f"{err}; stored: none") from None
    failed = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("FailedSOPSequence", [])}
    kept = set()
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            continue
        found = _call(server.display, cfg, lambda d=ds: client.search_for_instances(
            str(d.StudyInstanceUID), search_filters={"SOPInstanceUID": str(d.SOPInstanceUID)}))
        if found:
            kept.add(uid)
    return kept


def _store_dimse(datasets: list[Any], cfg: TransferConfig, shown: str) -> set[str]:
    """C-STORE over one association: the UIDs the peer answered success (or a warning) for."""
    from pynetdicom import AE

    match = _DIMSE.match(cfg.store_to or "")
    assert match is not None
    ae = AE(ae_title=cfg.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = cfg.timeout
    for sop_class, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(sop_class, syntax)
    kept: set[str] = set()
    with _quiet():
        for attempt in range(TRIES):
            assoc = ae.associate(match.group("host"), int(match.group("port")), ae_title=match.group("aet"))
            if assoc.is_established:
                break
            if assoc.is_rejected:
                raise StoreError(f"{shown}: association rejected (is {match.group('aet')!r} the server's AE title, "
                                 f"is {cfg.ae_title!r} allowed to store?); stored: none")
            if attempt == TRIES - 1:
                raise StoreError(f"{shown}: no association (connection refused, aborted or no answer within "
                                 f"{cfg.timeout:g} s; {TRIES} tries); stored: none")
            time.sleep(BACKOFF_S * 2**attempt)
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                # 0x0000 success; 0xB000, 0xB006, 0xB007 warnings: stored with coercion or elements discarded
                if code in (0x0000, 0xB000, 0xB006, 0xB007):
                    kept.add(str(ds.SOPInstanceUID))
        finally:
            if assoc.is_established:
                assoc.release()
    return kept
