"""fetch_model.py: Madry's URLs, file names and lines; --from_zip; offline and unsafe zips.

No test touches the network: downloads go to a local HTTP server or a closed local port.
"""

import functools
import hashlib
import http.server
import os
import socket
import threading
import time
import zipfile

import pytest

from helpers_dropin import run_script
from madry_ns import fetch
from madry_ns.errors import DownloadError

MEMBERS = {
    "models/": None,
    "models/adv_trained/": None,
    "models/adv_trained/checkpoint": 'model_checkpoint_path: "checkpoint-70000"\n',
    "models/adv_trained/checkpoint-70000.index": "index bytes",
    "models/adv_trained/checkpoint-70000.data-00000-of-00001": "data bytes",
    "models/adv_trained/config.json": '{"epsilon": 8.0, "num_steps": 7}\n',
}


def make_zip(path, members=MEMBERS):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            if text is None:
                z.writestr(zipfile.ZipInfo(name), "")
            else:
                z.writestr(name, text)
    return str(path)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_madry_urls_and_file_names():
    assert fetch.URLS == {
        "natural": "https://www.dropbox.com/s/cgzd5odqoojvxzk/natural.zip?dl=1",
        "adv_trained": "https://www.dropbox.com/s/g4b6ntrp8zrudbz/adv_trained.zip?dl=1",
        "secret": "https://www.dropbox.com/s/ywc0hg8lr5ba8zd/secret.zip?dl=1"}
    assert [fetch.zip_name(u) for u in fetch.URLS.values()] == [
        "natural.zip", "adv_trained.zip", "secret.zip"]


def test_from_zip_prints_madry_lines_and_extracts_the_model_folder(tmp_path):
    zip_path = make_zip(tmp_path / "elsewhere.zip")
    dest = tmp_path / "work"
    dest.mkdir()
    lines = []
    fetch.fetch(from_zip=zip_path, dest=str(dest), out=lines.append)
    assert lines == [f"SHA256 hash: {sha256_of(zip_path)}", "Extracting model",
                     "Extracted model in models/",
                     f"Model folder: {dest / 'models' / 'adv_trained'} "
                     f"(set \"model_dir\" to it)"]
    for name, text in MEMBERS.items():
        if text is not None:
            assert (dest / name).read_text() == text


def test_download_saves_madry_file_name_hashes_and_extracts(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    make_zip(served / "adv_trained.zip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/adv_trained.zip?dl=1"
        monkeypatch.setitem(fetch.URLS, "adv_trained", url)
        lines = []
        zip_path = fetch.fetch("adv_trained", dest=str(tmp_path), out=lines.append)
    finally:
        server.shutdown()
        server.server_close()
    assert zip_path == str(tmp_path / "adv_trained.zip")  # kept, as Madry's
    assert lines[:4] == ["Downloading models",
                         f"SHA256 hash: {sha256_of(served / 'adv_trained.zip')}",
                         "Extracting model", "Extracted model in models/"]
    assert (tmp_path / "models/adv_trained/checkpoint-70000.index").exists()


def test_published_digest_mismatch_is_noted(tmp_path):
    lines = []
    fetch.fetch("natural", from_zip=make_zip(tmp_path / "natural.zip"), dest=str(tmp_path),
                out=lines.append)
    assert lines[1].startswith("note: this differs from the digest the maintainers published")
    assert fetch.PUBLISHED_SHA256["natural"] in lines[1]


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_download_fails_fast_with_instructions_and_no_partial_zip(
        tmp_path, monkeypatch):
    monkeypatch.setitem(fetch.URLS, "natural",
                        f"http://127.0.0.1:{closed_port()}/natural.zip?dl=1")
    lines = []
    start = time.perf_counter()
    with pytest.raises(DownloadError) as err:
        fetch.fetch("natural", dest=str(tmp_path), out=lines.append)
    assert time.perf_counter() - start < 5
    assert lines == ["Downloading models"]
    assert "cannot download" in str(err.value) and "--from_zip" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_unresponsive_server_times_out(tmp_path, monkeypatch):
    # Accepts the connection (kernel backlog) but never answers.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        monkeypatch.setattr(fetch, "TIMEOUT_SECONDS", 0.5)
        monkeypatch.setitem(fetch.URLS, "secret",
                            f"http://127.0.0.1:{listener.getsockname()[1]}/secret.zip?dl=1")
        start = time.perf_counter()
        with pytest.raises(DownloadError, match="cannot download"):
            fetch.fetch("secret", dest=str(tmp_path), out=lambda *a: None)
        assert time.perf_counter() - start < 5
    finally:
        listener.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("evil", ["../escaped.txt", "models/../../escaped.txt",
                                  "/tmp/absolute_escape.txt", "..\\escaped.txt",
                                  "C:/escaped.txt"])
def test_zip_path_traversal_is_refused_before_anything_is_extracted(tmp_path, evil):
    zip_path = make_zip(tmp_path / "evil.zip", {**MEMBERS, evil: "pwned"})
    dest = tmp_path / "work"
    dest.mkdir()
    with pytest.raises(DownloadError, match="refusing to extract"):
        fetch.fetch(from_zip=zip_path, dest=str(dest), out=lambda *a: None)
    assert os.listdir(dest) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_not_a_zip_and_missing_zip_are_clear_errors(tmp_path):
    bad = tmp_path / "adv_trained.zip"
    bad.write_bytes(b"<html>Dropbox error page</html>")
    with pytest.raises(DownloadError, match="not a readable zip"):
        fetch.fetch(from_zip=str(bad), dest=str(tmp_path), out=lambda *a: None)
    with pytest.raises(DownloadError, match="not found"):
        fetch.fetch(from_zip=str(tmp_path / "nope.zip"), dest=str(tmp_path),
                    out=lambda *a: None)


def test_script_from_zip_and_usage_errors(tmp_path):
    zip_path = make_zip(tmp_path / "adv_trained.zip")
    ok = run_script("fetch_model.py", tmp_path, "--from-zip", zip_path, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[1:3] == ["Extracting model", "Extracted model in models/"]
    assert (tmp_path / "models/adv_trained/config.json").exists()

    bad_name = run_script("fetch_model.py", tmp_path, "bogus", timeout=60)
    assert bad_name.returncode != 0 and "natural, adv_trained, secret" in bad_name.stderr

    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"not a zip")
    refused = run_script("fetch_model.py", tmp_path, "--from_zip", str(broken), timeout=60)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")
    assert "Traceback" not in refused.stderr
