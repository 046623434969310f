"""Madry's released models, as cifar10_challenge's fetch_model.py: download, hash, unzip.

`fetch("adv_trained")` downloads Madry's zip into the working directory under his file name
(`adv_trained.zip`), prints its SHA-256 and extracts it there (the zips hold
`models/<folder>/checkpoint-70000.*`, the `checkpoint` state file and the training
`config.json`). `fetch(from_zip=PATH)` unpacks a zip obtained elsewhere, for machines
without network access. Members with absolute paths or `..` components are refused before
anything is extracted (Python's zipfile would silently rewrite them instead).

No TensorFlow here: the script answers in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile

from madry_ns import files
from madry_ns.errors import DownloadError
from madry_ns.progress import Progress

# cifar10_challenge fetch_model.py at f15682d (URLs changed once, in Dec 2017).
URLS = {
    "natural": "https://www.dropbox.com/s/cgzd5odqoojvxzk/natural.zip?dl=1",
    "adv_trained": "https://www.dropbox.com/s/g4b6ntrp8zrudbz/adv_trained.zip?dl=1",
    "secret": "https://www.dropbox.com/s/ywc0hg8lr5ba8zd/secret.zip?dl=1",
}
# The one zip digest the maintainers published (cifar10_challenge issue #30).
PUBLISHED_SHA256 = {
    "natural": "6af2addfc5bc75e3b16b8654c907a8dfaebeffc600871115460063ade1cd1ee7",
}
# Seconds without an answer before a download is given up (connect and each read).
TIMEOUT_SECONDS = 30
# The URL opener; a module-level hook so tests can point it elsewhere.
urlopen = urllib.request.urlopen


def zip_name(url: str) -> str:
    """Madry's local file name: `url.split('/')[-1].split('?')[0]`."""
    return url.split("/")[-1].split("?")[0]


def download(url: str, path: str) -> None:
    """Stream `url` to `path` (atomically: a failed download leaves no partial zip)."""
    try:
        with urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            size_mib = -(-int(response.headers.get("Content-Length") or 0) // 2**20)
            bar = Progress(size_mib, "downloading (MiB)")  # drawn on a terminal only
            with files.atomic_open(path, "wb") as f:
                while chunk := response.read(2**20):
                    f.write(chunk)
                    bar.update()
            bar.close()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"cannot download {url} ({reason}). Without network access, download the zip "
            f"on a machine that has it and run: python fetch_model.py --from_zip "
            f"PATH/{zip_name(url)}") from None


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def unsafe_member(name: str) -> bool:
    """Whether a zip member would land outside the extraction folder."""
    parts = name.replace("\\", "/").split("/")
    return (name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")
            or ".." in parts)


def extract(zip_path: str, dest: str = ".") -> str:
    """Extract `zip_path` into `dest` after checking every member; returns the first member
    name (Madry prints it as where the model was extracted)."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()
            bad = [n for n in names if unsafe_member(n)]
            if bad:
                raise DownloadError(
                    f"{zip_path}: refusing to extract: member '{bad[0]}' would be written "
                    f"outside {os.path.abspath(dest)} (absolute path or '..'); "
                    f"{len(bad)} such member(s) in all")
            if not names:
                raise DownloadError(f"{zip_path}: the zip is empty")
            archive.extractall(dest)
    except FileNotFoundError:
        raise DownloadError(f"zip file '{zip_path}' not found") from None
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{zip_path}: not a readable zip file ({e}); the download may "
                            f"be incomplete") from None
    return names[0]


def model_dirs(dest: str, names: list[str]) -> list[str]:
    """Folders among the extracted members that hold a `checkpoint` state file."""
    return sorted({os.path.join(dest, os.path.dirname(n)) for n in names
                   if os.path.basename(n) == "checkpoint"})


def fetch(name: str | None = None, from_zip: str | None = None, dest: str = ".",
          out=print) -> str:
    """Download Madry's model `name` (natural, adv_trained, secret) into `dest` and extract
    it there, or extract the zip `from_zip`; print Madry's lines. Returns the zip path."""
    if from_zip is None:
        if name not in URLS:
            raise DownloadError(f"unknown model {name!r}; expected one of {', '.join(URLS)}")
        url = URLS[name]
        zip_path = os.path.join(dest, zip_name(url))
        out("Downloading models")
        download(url, zip_path)
    else:
        zip_path = from_zip
        if not os.path.isfile(zip_path):
            raise DownloadError(f"zip file '{zip_path}' not found")
    digest = sha256(zip_path)
    out(f"SHA256 hash: {digest}")
    published = PUBLISHED_SHA256.get(name or "")
    if published and digest != published:
        out(f"note: this differs from the digest the maintainers published for '{name}' "
            f"(cifar10_challenge issue #30: {published}); Dropbox may have re-packed it")
    out("Extracting model")
    first = extract(zip_path, dest)
    out(f"Extracted model in {first}")
    with zipfile.ZipFile(zip_path) as archive:
        for folder in model_dirs(dest, archive.namelist()):
            out(f"Model folder: {os.path.normpath(folder)} (set \"model_dir\" to it)")
    return zip_path

