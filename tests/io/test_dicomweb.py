"""Into a real PACS and back: ``predict`` reads studies from a running Orthanc over DICOMweb and stores its SR and SEG
there with STOW-RS and with C-STORE; what Orthanc then holds is read back through its REST API. The bad cases (wrong
port, wrong password, unknown study, no CT series, server stopped mid-transfer, STOW refused) run against the same
live server. Only 127.0.0.1 is contacted. One Orthanc for the module (``tests/orthanc.py``)."""

from __future__ import annotations

import csv
import json
import logging
import os
import select
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from dicom_utils import copy_series
from model_factories import tiny_predict_model
from orthanc import AET, PASSWORD, USER, Orthanc, free_port
from pydicom.uid import generate_uid

from covidctnet.cli import cli
from covidctnet.core.errors import ConfigError, InputError
from covidctnet.io import dicomweb
from covidctnet.io.dicomweb import StoreError, TransferConfig, TransferError

pytest.importorskip("dicomweb_client")
pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

# put into the copy uploaded to Orthanc: they must reach the stored SR and SEG and nothing else
PATIENT = {"PatientName": "Roe^Richard", "PatientID": "PID-27-ORTHANC", "PatientBirthDate": "19610203"}


class Logged(logging.Handler):
    """Every log record's text, whatever handlers and levels the CLI sets up."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def invoke(*args: str) -> tuple[object, str]:
    """Run the CLI in this process: ``(result, stdout + stderr + every log line)``."""
    logged = Logged()
    root = logging.getLogger()
    level = root.level
    root.addHandler(logged)
    root.setLevel(logging.DEBUG)  # the HTTP libraries' DEBUG lines would name query values: they must stay quiet
    try:
        result = CliRunner().invoke(cli, list(args))
    finally:
        root.removeHandler(logged)
        root.setLevel(level)
    return result, result.output + "\n" + "\n".join(logged.lines)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory):
    """Orthanc's credentials in the environment, no ~/.netrc, and temporary folders where the test sees them."""
    tmp = tmp_path_factory.mktemp("tempdir")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dicomweb.USER_ENV, USER)
        mp.setenv(dicomweb.PASSWORD_ENV, PASSWORD)
        mp.delenv(dicomweb.TOKEN_ENV, raising=False)
        mp.setenv("NETRC", str(tmp / "no-netrc"))
        mp.setattr(tempfile, "tempdir", str(tmp))
        yield tmp


def _new_uids(series_uid: str, study_uid: str | None = None):
    def edit(_, ds):
        if study_uid:
            ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return edit


@pytest.fixture(scope="module")
def studies(orthanc, dicom_dirs, tmp_path_factory):
    """Uploaded: the control series with a patient's identifiers; a copy in the study whose SR Orthanc refuses; a
    study holding one non-CT image."""
    root = tmp_path_factory.mktemp("series")

    def edit(_, ds):
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)

    main = copy_series(dicom_dirs["control"], root / "main", edit=edit)
    reject = copy_series(dicom_dirs["control"], root / "reject", edit=_new_uids(generate_uid(), orthanc.reject_study))
    other = copy_series(dicom_dirs["control"], root / "other", keep=lambda i: i == 0,
                        edit=lambda i, ds: (_new_uids(generate_uid(), generate_uid())(i, ds),
                                            setattr(ds, "Modality", "OT")))
    first = pydicom.dcmread(next(main.glob("*.dcm")), stop_before_pixels=True)
    return {"main": main, "uid": orthanc.upload(main), "series_uid": str(first.SeriesInstanceUID),
            "reject_uid": orthanc.upload(reject), "other_uid": orthanc.upload(other)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_predict_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def runs(orthanc, studies, model, tmp_path_factory, environment):
    """Two ``predict`` runs: the folder (with an unknown DICOMweb study beside it: a batch with one bad study), its
    SR and SEG stored with C-STORE; and the same study from DICOMweb (--keep-download), stored with STOW-RS."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--model", str(model), "--device", "cpu"]
    study_url = f"{orthanc.dicomweb}/studies/{studies['uid']}"
    unknown = f"{orthanc.dicomweb}/studies/{generate_uid()}"
    local = invoke("predict", str(studies["main"]), unknown, "-o", str(root / "local"), "--dicom-out",
                   str(root / "local-dicom"), "--store-to", f"dimse://{AET}@127.0.0.1:{orthanc.dicom_port}",
                   "--ae-title", "CTNET27", *common)
    web = invoke("predict", study_url, "-o", str(root / "web"), "--dicom-out", str(root / "web-dicom"),
                 "--keep-download", str(root / "keep"), "--store-to", orthanc.dicomweb, *common)
    out = {"root": root, "study_url": study_url, "unknown": unknown}
    for name, (result, text) in {"local": local, "web": web}.items():
        out[name] = {"result": result, "text": text, "dir": root / name,
                     "csv": list(csv.DictReader(open(root / name / "report.csv"))) if (root / name).is_dir() else [],
                     "json": json.loads((root / name / "report.json").read_text()) if (root / name).is_dir() else {}}
    return out


def _instance(orthanc: Orthanc, sop_uid: str) -> pydicom.Dataset:
    """The instance Orthanc holds, downloaded through its REST API."""
    import requests

    found = requests.post(orthanc.url + "/tools/lookup", data=sop_uid, auth=(USER, PASSWORD), timeout=10,
                          proxies={"http": "", "https": ""}).json()
    ids = [f["ID"] for f in found if f["Type"] == "Instance"]
    assert ids, f"{sop_uid} not in Orthanc"
    from io import BytesIO

    return pydicom.dcmread(BytesIO(orthanc.get(f"/instances/{ids[0]}/file").content))


def _sr_numbers(sr: pydicom.Dataset) -> dict[str, float]:
    numbers = {}

    def walk(items):
        for item in items:
            if item.get("ValueType") == "NUM":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                numbers[name] = float(item.MeasuredValueSequence[0].NumericValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return numbers


def _check_stored(orthanc, studies, run, target, study_id):
    row = next(r for r in run["json"]["studies"] if r["study_id"] == study_id)
    csv_row = next(r for r in run["csv"] if r["study_id"] == study_id)
    stored = row["stored"]
    assert stored["to"] == target and len(stored["sop_instance_uids"]) == 2
    seg, sr = (_instance(orthanc, uid) for uid in stored["sop_instance_uids"])
    assert (seg.Modality, sr.Modality) == ("SEG", "SR")
    # two new series in the source study, next to the CT
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == studies["uid"]
    series = {s["MainDicomTags"]["SeriesInstanceUID"]: s["MainDicomTags"]["Modality"]
              for s in orthanc.series_of(studies["uid"])}
    assert series[seg.SeriesInstanceUID] == "SEG" and series[sr.SeriesInstanceUID] == "SR"
    assert series[studies["series_uid"]] == "CT" and seg.SeriesInstanceUID != sr.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == studies["series_uid"]
    numbers = _sr_numbers(sr)  # written in the class order: control, COVID-19, CAP
    assert list(numbers.values()) == [float(csv_row[f"p_{c}"]) for c in ("control", "covid", "cap")], numbers
    assert "COVID-19" in list(numbers)[1] and "pneumonia" in list(numbers)[2]
    assert csv_row["stored"] == " ".join([target, *stored["sop_instance_uids"]])
    return sr


def test_predict_from_dicomweb_gives_the_folder_s_probabilities_and_stores_by_stow(orthanc, studies, runs):
    web, local = runs["web"], runs["local"]
    assert web["result"].exit_code == 0, web["text"]
    (row,) = web["csv"]
    assert row["study_id"] == studies["uid"]  # the Study Instance UID, not a patient tag
    local_row = next(r for r in local["csv"] if r["study_id"] == "main")
    assert [row[f"p_{c}"] for c in ("control", "covid", "cap")] == \
        [local_row[f"p_{c}"] for c in ("control", "covid", "cap")]
    assert web["json"]["studies"][0]["source"] == runs["study_url"]
    assert "32 instances retrieved" in web["text"]
    sr = _check_stored(orthanc, studies, web, orthanc.dicomweb, studies["uid"])
    assert str(sr.PatientID) == PATIENT["PatientID"]  # the SR joins the patient's study in the PACS...
    # ...and the patient's identifiers appear nowhere else: report files, manifest, printed lines and logs
    for name in ("report.csv", "report.json", "report.html", "manifest.csv"):
        text = (web["dir"] / name).read_text()
        assert not [v for v in PATIENT.values() if v in text], name
    assert not [v for v in PATIENT.values() if v in web["text"]]
    kept = sorted((runs["root"] / "keep" / studies["uid"]).glob("*.dcm"))  # --keep-download
    assert len(kept) == 32
    assert {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in kept} == \
        {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in studies["main"].glob("*.dcm")}


def test_c_store(orthanc, studies, runs):
    local = runs["local"]
    _check_stored(orthanc, studies, local, f"dimse://{AET}@127.0.0.1:{orthanc.dicom_port}", "main")
    assert "CTNET27" not in (local["dir"] / "report.csv").read_text()  # the target is the called AE


def test_batch_goes_on_past_an_unknown_study(runs):
    local = runs["local"]
    assert local["result"].exit_code == 1, local["text"]
    rows = {r["source"]: r for r in csv.DictReader(open(local["dir"] / "manifest.csv"))}
    bad = rows[runs["unknown"]]
    assert bad["status"] == "error" and bad["error"] == f"{runs['unknown']}: no such study on the server"
    assert rows["main"]["status"] == "ok"


def test_report_html_embeds_the_overlay_and_fits_1200_pixels(runs, tmp_path):
    """report.html of the DICOMweb run (64-character UIDs as study id and stored instances: the widest case), as
    headless Chromium lays it out in a 1,200-pixel window."""
    from browser import layout

    page = runs["web"]["dir"] / "report.html"
    assert page.read_text().count("<img class=\"overlay\"") == 1 and "data:image/png;base64," in page.read_text()
    shown = layout(page, tmp_path, width=1200)
    assert shown["inner"] == 1200, shown
    assert shown["scroll"] <= 1200 and shown["right"] <= 1200, shown  # no horizontal overflow
    (natural, width), = shown["images"]
    assert natural == 600 and width >= 250, shown  # the small overlay, decoded and shown


def test_query_finds_studies_and_preprocess_reads_them(orthanc, studies, tmp_path):
    """A QIDO search matching the three uploaded studies (same StudyDate): two preprocessed, the one without a CT
    series recorded as failed (exit code 1)."""
    url = orthanc.dicomweb
    date = str(pydicom.dcmread(next(studies["main"].glob("*.dcm")), stop_before_pixels=True).StudyDate)
    result, text = invoke("preprocess", url, "--query", f"StudyDate={date}", "-o", str(tmp_path / "web"))
    assert result.exit_code == 1, text
    rows = {r["study_id"]: r for r in csv.DictReader(open(tmp_path / "web" / "manifest.csv"))}
    assert set(rows) == {studies["uid"], studies["reject_uid"], studies["other_uid"]}
    assert rows[studies["uid"]]["status"] == rows[studies["reject_uid"]]["status"] == "ok"
    assert rows[studies["other_uid"]]["error"] == (f"{url}/studies/{studies['other_uid']}: no CT series in this "
                                                   "study (modalities: OT)")
    assert not [v for v in PATIENT.values() if v in text or v in (tmp_path / "web" / "manifest.csv").read_text()]
    result, text = invoke("preprocess", str(studies["main"]), "-o", str(tmp_path / "local"))
    assert result.exit_code == 0, text
    web = nib.load(tmp_path / "web" / f"{studies['uid']}.nii.gz")
    local = nib.load(tmp_path / "local" / "main.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(web.dataobj), np.asanyarray(local.dataobj))
    assert not list(Path(tempfile.gettempdir()).glob("covidctnet-dicomweb-*"))  # the download was deleted
    # a query that matches nothing: one line that does not repeat the value
    result, text = invoke("preprocess", url, "--query", "PatientID=NOBODY-27", "-o", str(tmp_path / "none"))
    assert result.exit_code == 2 and "no study matches the --query filters (PatientID)" in result.stderr
    assert "NOBODY-27" not in text and not (tmp_path / "none").exists()


def test_slice_scores_reads_a_series_url(orthanc, studies, model, tmp_path):
    url = f"{orthanc.dicomweb}/studies/{studies['uid']}/series/{studies['series_uid']}"
    result, text = invoke("slice-scores", url, "--model", str(model), "--device", "cpu", "-o", str(tmp_path))
    assert result.exit_code == 0, text
    rows = list(csv.DictReader(open(tmp_path / f"{studies['series_uid']}_slices.csv")))
    assert len(rows) == 32 and {r["study_id"] for r in rows} == {studies["series_uid"]}


def _one_line_error(result, out: Path) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert not out.exists()  # no partial output
    return lines[0]


@pytest.mark.parametrize("case", ["wrong port", "wrong password", "unknown study", "no CT series",
                                  "credentials in the URL"])
def test_bad_input_is_one_line_naming_the_url(orthanc, studies, model, tmp_path, monkeypatch, case):
    uid = {"unknown study": generate_uid(), "no CT series": studies["other_uid"]}.get(case, studies["uid"])
    base = orthanc.dicomweb
    if case == "wrong port":
        base = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    if case == "wrong password":
        monkeypatch.setenv(dicomweb.PASSWORD_ENV, "not-the-password")
    url = f"{base}/studies/{uid}"
    if case == "credentials in the URL":
        url = url.replace("127.0.0.1", f"{USER}:{PASSWORD}@127.0.0.1")
    result, text = invoke("predict", url, "-o", str(tmp_path / "out"), "--model", str(model), "--device", "cpu")
    line = _one_line_error(result, tmp_path / "out")
    expected = {"wrong port": "connection refused", "wrong password": "401 Unauthorized",
                "unknown study": "no such study on the server", "no CT series": "no CT series in this study "
                "(modalities: OT)", "credentials in the URL": "credentials in the URL are refused"}[case]
    assert expected in line, line
    if case != "credentials in the URL":
        assert line.startswith(f"Error: {base}/studies/{uid}: "), line
    assert PASSWORD not in text and "not-the-password" not in text and "Traceback" not in text


def test_netrc_credentials_and_a_bearer_token(orthanc, studies, tmp_path, monkeypatch):
    monkeypatch.delenv(dicomweb.USER_ENV)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    cfg = TransferConfig(query=(f"StudyInstanceUID={studies['uid']}",), timeout=10)
    assert [s.study_uid for s in dicomweb.find_studies(orthanc.dicomweb, cfg)] == [studies["uid"]]
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(TransferError, match="401 Unauthorized"):
        dicomweb.find_studies(orthanc.dicomweb, cfg)
    # a token goes in the Authorization header and nowhere in the auth object's text (Orthanc has no token check)
    monkeypatch.setenv(dicomweb.TOKEN_ENV, "tok-27-secret")
    auth = dicomweb._credentials("127.0.0.1")
    import requests

    request = auth(requests.Request("GET", "http://127.0.0.1/").prepare())
    assert request.headers["Authorization"] == "Bearer tok-27-secret" and "tok-27-secret" not in repr(auth)


def test_insecure_warns_and_turns_verification_off(caplog):
    caplog.set_level(logging.WARNING, logger="covidctnet.io.dicomweb")
    dicomweb._warned_insecure = False
    server = dicomweb._Server("https://127.0.0.1:1/dicom-web", "127.0.0.1")
    assert dicomweb._session(server.host, TransferConfig()).verify in (True, os.environ.get("REQUESTS_CA_BUNDLE"))
    client = dicomweb._client(server, TransferConfig(insecure=True))
    assert client._session.verify is False and "not verified (--insecure)" in caplog.text


def test_tls_is_verified_unless_insecure(orthanc, tmp_path, monkeypatch, caplog):
    """HTTPS with a self-signed certificate, as a TLS-terminating relay in front of Orthanc gives it (Debian's Orthanc
    1.10.1 crashes on its own HTTPS): refused by default, accepted with that certificate as the CA bundle
    (REQUESTS_CA_BUNDLE) or with --insecure, which warns. The query matches nothing: "no study matches" says the TLS
    connection and the QIDO search went through."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    relay = _Relay(orthanc, tls=context)
    try:
        url = f"dicomweb+https://127.0.0.1:{relay.port}/dicom-web"
        cfg = TransferConfig(query=("StudyDate=19000101",), timeout=10)
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        with pytest.raises(TransferError, match=r"^dicomweb\+https://127.0.0.1:\d+/dicom-web: TLS certificate not verified"):
            dicomweb.find_studies(url, cfg)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        with pytest.raises(InputError, match="no study matches"):
            dicomweb.find_studies(url, cfg)
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        dicomweb._warned_insecure = False
        caplog.set_level(logging.WARNING, logger="covidctnet.io.dicomweb")
        with pytest.raises(InputError, match="no study matches"):
            dicomweb.find_studies(url, TransferConfig(query=cfg.query, insecure=True))
        assert "TLS certificates are not verified (--insecure)" in caplog.text
    finally:
        relay.close()


def test_bad_urls_and_targets():
    for bad in ("dicomweb+http://127.0.0.1:8042/dicom-web/studies", "dicomweb+http://127.0.0.1:8042/dicom-web/studies/1/series"):
        with pytest.raises(ConfigError, match="StudyInstanceUID"):
            dicomweb.find_studies(bad)
    with pytest.raises(ConfigError, match="--query"):
        dicomweb.find_studies("dicomweb+http://127.0.0.1:8042/dicom-web")
    with pytest.raises(ConfigError, match="dimse://AET@HOST:PORT"):
        dicomweb.check_store_target("dimse://127.0.0.1:104")
    with pytest.raises(ConfigError, match="base URL"):
        dicomweb.check_store_target("dicomweb+http://127.0.0.1:8042/dicom-web/studies/1.2")
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        TransferConfig(query=("PatientID",))
    assert dicomweb.is_dicomweb_url(Path("dicomweb+https://h/dicom-web/studies/1"))  # a click.Path folds the //
    assert dicomweb.find_studies(str(Path("dicomweb+https://h:1/dw/studies/1.2")))[0].display == \
        "dicomweb+https://h:1/dw/studies/1.2"


def test_store_needs_dicom_out(runs, model, tmp_path):
    result, _ = invoke("predict", runs["study_url"], "--store-to", "dimse://A@127.0.0.1:1", "-o", str(tmp_path / "o"),
                       "--model", str(model))
    assert result.exit_code == 2 and "--dicom-out" in result.stderr and not (tmp_path / "o").exists()


def test_stow_kept_in_part_reports_what_was_stored(orthanc, studies, model, tmp_path):
    """Orthanc's filter drops the SR of this study although its STOW answer says stored: the lookup afterwards
    finds only the SEG, the study fails and names both, and it leaves no output."""
    url = f"{orthanc.dicomweb}/studies/{studies['reject_uid']}"
    result, text = invoke("predict", url, "-o", str(tmp_path / "out"), "--dicom-out", str(tmp_path / "dicom"),
                          "--store-to", orthanc.dicomweb, "--model", str(model), "--device", "cpu")
    line = _one_line_error(result, tmp_path / "out")
    # the study's URL, then the target's
    assert line.startswith(f"Error: {url}: {orthanc.dicomweb}: the server did not store 1 of 2 instances ("), line
    stored = line.split("; stored: ")[1].split()
    assert len(stored) == 1 and _instance(orthanc, stored[0]).Modality == "SEG"
    assert not list((tmp_path / "dicom").rglob("*.dcm"))  # the study failed: its SR and SEG files went too


def test_store_refused_or_unreachable(orthanc, runs, tmp_path):
    files = sorted((runs["root"] / "web-dicom" / runs["web"]["csv"][0]["study_id"]).glob("*.dcm"))
    assert len(files) == 2
    wrong = f"dicomweb+http://127.0.0.1:{orthanc.http_port}/not-dicom-web"
    with pytest.raises(StoreError, match=r"^dicomweb\+http://127.0.0.1:\d+/not-dicom-web: .*404.*; stored: none$"):
        dicomweb.store(files, TransferConfig(store_to=wrong, timeout=10))
    with pytest.raises(StoreError, match="no association .*; stored: none$"):
        dicomweb.store(files, TransferConfig(store_to=f"dimse://{AET}@127.0.0.1:{free_port()}", timeout=5))


class _Relay:
    """A TCP relay on 127.0.0.1 to Orthanc's HTTP port. ``tls``: it speaks HTTPS to the client (a TLS-terminating
    proxy); ``limit``: it passes that many bytes of a connection's answers, then stops Orthanc and closes (a server
    gone in the middle of a transfer; later connections find nothing behind)."""

    def __init__(self, orthanc: Orthanc, limit: int | None = None, tls: Any = None) -> None:
        self.orthanc, self.limit, self.tls = orthanc, limit, tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        """One connection, relayed both ways from this one thread (an SSL socket must not be used by two)."""
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.orthanc.http_port), timeout=5)
        except OSError:
            client.close()
            return
        sent = 0
        try:
            while True:
                pending = isinstance(client, ssl.SSLSocket) and client.pending()
                ready = [client] if pending else select.select([client, upstream], [], [], 30)[0]
                if not ready:
                    break
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is client:
                        upstream.sendall(data)
                        continue
                    if self.limit is not None and sent + len(data) > self.limit:
                        client.sendall(data[: self.limit - sent])
                        self.orthanc.stop()
                        return
                    client.sendall(data)
                    sent += len(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()


def test_server_stopped_mid_transfer(orthanc, studies, model, tmp_path):
    proxy = _Relay(orthanc, limit=2_000_000)  # the QIDO answers are a few kB; the series about 8 MB
    try:
        url = f"dicomweb+http://127.0.0.1:{proxy.port}/dicom-web/studies/{studies['uid']}"
        result, text = invoke("predict", url, "-o", str(tmp_path / "out"), "--keep-download", str(tmp_path / "keep"),
                              "--timeout", "5", "--model", str(model), "--device", "cpu")
        line = _one_line_error(result, tmp_path / "out")
        assert line.startswith(f"Error: {url}: ") and "cut short" in line and "(3 tries)" in line, line
        assert not (tmp_path / "keep" / studies["uid"]).exists()  # no partial download kept
        assert orthanc.process is None  # the server was indeed stopped by the relay
    finally:
        proxy.close()
        orthanc.stop()
        orthanc.start()  # for the tests after this one
