"""The MONAI Label app (``eoir_bundle/monailabel_app``): the real server, over HTTP on 127.0.0.1.

The app needs MONAI Label in this environment (``bash eoir_bundle/monailabel_app/install.sh``,
which ``.ci/run`` runs); without it this test fails, it does not skip. Nothing here imports
MONAI Label at collection time.
"""

from __future__ import annotations

import email.parser
import email.policy
import http.client
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from helpers import BUNDLE

ATLAS_NAMES = json.loads((BUNDLE / "sample" / "labels.json").read_text())["labels"]
TARGET = BUNDLE / "sample" / "imagesVal" / "LUMIRMRI_0004_0000.nii.gz"
TARGET_LABELS = BUNDLE / "sample" / "labelsVal" / "LUMIRMRI_0004_0000.nii.gz"
# instance optimisation steps per request: the config's default is 50 (Dice 0.91 on this pair);
# 10 keeps CI short (Dice 0.90; 0.84 with none)
IO_ITERATIONS = 10
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 900  # ~15 s on 2 idle cores; generous for a loaded CI machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, fields: dict | None = None, timeout: float = 10):
    """(status, headers, body) of one request; ``fields`` go as multipart/form-data, as MONAI
    Label's client (the one in its 3D Slicer module) sends them."""
    body, headers = b"", {}
    if fields is not None:
        boundary = "eoirTestBoundary7MA4YWxkTrZu0gW"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
        body = ("".join(parts) + f"--{boundary}--\r\n").encode()
        headers = {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": str(len(body))}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()


def _multipart(headers, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, content) of a multipart response."""
    head = f"Content-Type: {headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert message.is_multipart()
    return {p.get_param("name", header="content-disposition"): (p.get_filename(), p.get_payload(decode=True))
            for p in message.iter_parts()}


def _slicer_client_parse(headers, body: bytes) -> tuple[dict, dict]:
    """(form, files) as MONAI Label's client, which its 3D Slicer module uses, reads a result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the client parses with the cgi module
        from monailabel.client.client import MONAILabelUtils  # the server's environment has it

        return MONAILabelUtils.parse_multipart(io.BytesIO(body), headers)


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    labels = [k for k in np.unique(b) if k != 0]
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in labels]))


def _start_server(tmp_path: Path, port: int, *conf: str) -> tuple[subprocess.Popen, Path]:
    assert importlib.util.find_spec("monailabel") is not None, (
        "MONAI Label is not installed in this environment: run bash eoir_bundle/monailabel_app/install.sh"
    )
    exe = Path(sys.executable).parent / "monailabel"
    assert exe.is_file(), f"{exe} not found (bash eoir_bundle/monailabel_app/install.sh)"
    app = tmp_path / "app"  # MONAI Label writes into its app folder: serve a copy
    shutil.copytree(BUNDLE / "monailabel_app", app, ignore=shutil.ignore_patterns("model", "lib", "logs", "bin", "__pycache__"))
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(TARGET, studies / TARGET.name)
    env = dict(os.environ, MONAILABEL_PYEXE=sys.executable,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    log = tmp_path / "server.log"
    cmd = [str(exe), "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port), "--conf", "bundle", str(BUNDLE)]
    for key, value in zip(conf[::2], conf[1::2]):
        cmd += ["--conf", key, value]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    return proc, log


def _wait_ready(proc: subprocess.Popen, port: int, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            status, _, body = _request(port, "GET", "/info/", timeout=5)
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not answer /info/ within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_monailabel_server_propagates_the_atlas_labels_onto_a_study_image(tmp_path):
    port = _free_port()
    proc, log = _start_server(tmp_path, port)
    try:
        info = _wait_ready(proc, port, log)
        model = info["models"]["eoir_atlas"]
        assert model["type"] == "segmentation" and model["dimension"] == 3
        assert model["labels"] == {name: int(value) for value, name in ATLAS_NAMES.items()}
        assert info["labels"][0] == "background" and len(info["labels"]) == len(ATLAS_NAMES)
        assert model["config"]["io_iterations"] == 50  # the bundle's default

        # bad requests: one JSON line each, 4xx
        status, headers, body = _request(port, "POST", "/infer/eoir_atlas?image=no_such_image", fields={"params": "{}"})
        assert status == 404 and headers["content-type"] == "application/json", (status, body)
        assert "no_such_image" in json.loads(body)["detail"]
        status, _, body = _request(port, "POST", f"/infer/eoir_atlas?image={TARGET.name[:-7]}",
                                   fields={"params": json.dumps({"io_iterations": -1})})
        assert status == 422 and "io_iterations" in json.loads(body)["detail"], (status, body)

        # a good request after them, as 3D Slicer sends it
        start = time.monotonic()
        status, headers, body = _request(port, "POST", f"/infer/eoir_atlas?image={TARGET.name[:-7]}",
                                         fields={"params": json.dumps({"io_iterations": IO_ITERATIONS, "client_id": "t"})},
                                         timeout=REQUEST_TIMEOUT_S)
        seconds = time.monotonic() - start
        assert status == 200, (status, body[:500], log.read_text()[-3000:])
        assert headers["content-type"].startswith("multipart/form-data")
        parts = _multipart(headers, body)
        params = json.loads(parts["params"][1])
        assert params["label_names"] == model["labels"] and params["io_iterations"] == IO_ITERATIONS
        filename, data = parts["image"]
        assert filename.endswith(".nii.gz")  # the client saves it under this name; Slicer reads it by extension

        form, files = _slicer_client_parse(headers, body)
        assert list(files) == [filename] and json.loads(form["params"])["label_names"] == model["labels"]

        result_path = tmp_path / filename
        result_path.write_bytes(data)
        result, target = nib.load(str(result_path)), nib.load(str(TARGET))
        assert result.shape == target.shape
        np.testing.assert_allclose(result.affine, target.affine, atol=1e-5)
        labels = np.asarray(result.dataobj)
        assert np.issubdtype(labels.dtype, np.integer) and set(np.unique(labels)) <= set(model["labels"].values())
        dice = _mean_dice(labels, np.asarray(nib.load(str(TARGET_LABELS)).dataobj))
        assert dice >= 0.85, f"mean Dice {dice:.3f} of the propagated atlas labels"

        # 3D Slicer reads the result and the image with ITK: one geometry
        import SimpleITK as sitk

        a, b = sitk.ReadImage(str(result_path)), sitk.ReadImage(str(TARGET))
        assert a.GetSize() == b.GetSize()
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)

        status, _, _ = _request(port, "GET", "/info/")
        assert status == 200
        print(f"request: {seconds:.1f} s (io_iterations {IO_ITERATIONS}), mean Dice {dice:.3f}")
    finally:
        _stop(proc)
    assert proc.returncode is not None


def test_monailabel_server_with_a_missing_atlas_answers_one_json_line_per_request(tmp_path):
    port = _free_port()
    missing = tmp_path / "no_atlas.nii.gz"
    proc, log = _start_server(tmp_path, port, "atlas_image", str(missing), "atlas_label", str(TARGET_LABELS))
    try:
        info = _wait_ready(proc, port, log)
        assert "eoir_atlas" in info["models"]
        for _ in range(2):  # the server keeps serving
            status, headers, body = _request(port, "POST", f"/infer/eoir_atlas?image={TARGET.name[:-7]}",
                                             fields={"params": "{}"})
            assert status == 500 and headers["content-type"] == "application/json", (status, body)
            detail = json.loads(body)["detail"]
            assert str(missing) in detail and "\n" not in detail, detail
        assert _request(port, "GET", "/info/")[0] == 200
    finally:
        _stop(proc)
