"""A real Orthanc for the PACS tests: Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``.ci/run`` installs
them), started on 127.0.0.1 with free HTTP and DICOM ports, its own temporary storage and a configuration written
here. A test needing it is skipped when the packages are absent, except under ``CI=true``, where it fails (as
``browser.require_chromium`` does).

The server checks HTTP basic credentials (:data:`USER`, :data:`PASSWORD`) and has one Lua filter: it refuses SR
instances of the study :attr:`Orthanc.reject_study`, so that a STOW-RS of an SR and a SEG into that study is accepted
in part (the SEG) and rejected in part (the SR).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

USER, PASSWORD = "covidctnet", "orthanc-test-secret"
AET = "ORTHANC"
# where Debian's orthanc-dicomweb puts the plugin (a symlink to /usr/lib/orthanc/libOrthancDicomWeb.so.<version>)
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def _plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        found = sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []
        if found:
            return found[0]
    return None


def require_orthanc() -> tuple[str, Path]:
    """The Orthanc executable and the DICOMweb plugin; skips the test without them (fails under CI=true)."""
    exe = shutil.which("Orthanc") or (("/usr/sbin/Orthanc") if Path("/usr/sbin/Orthanc").is_file() else None)
    plugin = _plugin()
    if exe is None or plugin is None:
        msg = "Orthanc or its DICOMweb plugin not found (Debian: apt-get install orthanc orthanc-dicomweb)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe, plugin


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process on 127.0.0.1 (``start``/``stop``; the storage survives a restart)."""

    def __init__(self, root: Path) -> None:
        self.exe, plugin = require_orthanc()
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        self.reject_study = generate_uid()
        (root / "filter.lua").write_text(
            "function ReceivedInstanceFilter(dicom, origin, info)\n"
            f"  if dicom.StudyInstanceUID == '{self.reject_study}' and dicom.Modality == 'SR' then\n"
            "    return false\n  end\n  return true\nend\n")
        config = {
            "Name": "covidctnet-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": AET, "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "LuaScripts": [str(root / "filter.lua")], "DicomModalities": {}, "OrthancPeers": {}, "SaveJobs": False,
            "HttpsVerifyPeers": True, "StorageCompression": False, "OverwriteInstances": True,
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """``dicomweb+http://127.0.0.1:PORT/dicom-web``: the form covidctnet takes."""
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> None:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - the process writes to it until stop()
        self.process = subprocess.Popen([self.exe, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.root)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if self.get("/plugins").status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, auth=(USER, PASSWORD), timeout=10,
                            proxies={"http": "", "https": ""})

    def json(self, path: str) -> Any:
        response = self.get(path)
        response.raise_for_status()
        return response.json()

    def upload(self, folder: Path) -> str:
        """Every ``*.dcm`` of ``folder`` through the REST API; returns the StudyInstanceUID."""
        uid = None
        for path in sorted(folder.glob("*.dcm")):
            r = requests.post(self.url + "/instances", data=path.read_bytes(), auth=(USER, PASSWORD), timeout=30,
                              proxies={"http": "", "https": ""})
            r.raise_for_status()
            uid = uid or str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        assert uid is not None, f"no DICOM file in {folder}"
        return uid

    def study(self, study_uid: str) -> dict[str, Any]:
        """Orthanc's record of a study (``/studies/<id>`` with ``Series``), looked up by StudyInstanceUID."""
        found = requests.post(self.url + "/tools/lookup", data=study_uid, auth=(USER, PASSWORD), timeout=10,
                              proxies={"http": "", "https": ""}).json()
        ids = [f["ID"] for f in found if f["Type"] == "Study"]
        assert ids, f"study {study_uid} not in Orthanc"
        return self.json(f"/studies/{ids[0]}")

    def series_of(self, study_uid: str) -> list[dict[str, Any]]:
        """Each series of the study: Orthanc's series record (``MainDicomTags``, ``Instances``)."""
        return [self.json(f"/series/{s}") for s in self.study(study_uid)["Series"]]
