#!/usr/bin/env python3
"""Rebuild the embedded multi-domain corpus shipped in ``src/divmoe/data/corpus/``.

The corpus consists only of real, third-party text taken from Debian packages
(no text is written by us).  Eight domains:

==========  =====================================================  =====================
domain      source (Debian bookworm package)                       licence
==========  =====================================================  =====================
english     ``r-cran-janeaustenr``: Jane Austen's six novels       public domain text
            (R lazy-load database ``data/Rdata.rdb``)              (package: MIT)
spanish     ``sword-text-sparv``: Reina-Valera 1909 Bible          public domain
            (SWORD zText module ``spaRV1909eb``, OSIS markup)
python      ``libpython3.11-stdlib``: CPython 3.11 standard        PSF License v2
            library ``*.py`` sources (no test directories)
docs        ``python3.11-doc``: reStructuredText sources of the    PSF License v2
            Python 3.11 documentation (``html/_sources``)
c           ``libc6-dev``: GNU C Library 2.36 headers (``*.h``)     LGPL-2.1+
shell       ``bash-completion``: bash completion scripts            GPL-2+
pod         ``perl-doc``: Perl 5.36 manual pages in POD             GPL-1+ or Artistic
tex         ``texlive-latex-base``: LaTeX kernel and LaTeX Project  LPPL 1.3c
            bundles (``.sty .cls .def .ltx .tex``)
==========  =====================================================  =====================

The first four domains are *frozen*: by default they are copied verbatim from the
existing ``corpus.jsonl.xz`` (checked against its manifest), because the Debian
archive has since moved past the Python package version they were built from and
earlier results must stay comparable.  ``--rebuild-frozen`` rebuilds them from
their packages instead (byte-identical only with the recorded versions).

Processing (all deterministic):

* english: the R data objects (one character vector of lines per novel) are read
  with a small pure-Python R-unserializer; each novel is cut into chapters at
  lines ``CHAPTER n`` / ``Chapter n``; front matter is kept with chapter 1.
  One document = one chapter.
* spanish: the SWORD ``.bzs``/``.bzv``/``.bzz`` indices are decoded (zlib
  blocks), verses are concatenated and cut at OSIS ``<chapter sID=...>``
  markers; all OSIS tags (``<w lemma=...>``, milestones, divs) are stripped,
  leaving plain text, one verse per line.  One document = one chapter.
* python: one document = one ``.py`` file (UTF-8, <= 60 kB, excluding
  ``test/``, ``tests/``, ``idle_test/`` and the generated ``pydoc_data``).
* docs: one document = one ``.rst.txt`` file (<= 60 kB), kept verbatim.
* c, shell, pod, tex: one document = one file (UTF-8, not empty, <= 60 kB, no
  symlinks), kept verbatim; see ``FILE_DOMAINS`` for the folders and suffixes.

For each domain, documents are ordered by ``sha256("select:" + id)`` and taken
until ``--target-bytes`` (UTF-8 bytes, default 1.8 MB) is reached.  The
validation split is then taken in ``sha256("split:" + id)`` order until it
holds ``max(--val-fraction * domain_bytes, --min-val-bytes)`` bytes.  Line
endings are normalised to ``\\n``; nothing else is changed.

Output: ``corpus.jsonl.xz`` (one JSON object per line:
``{"id", "domain", "split", "text"}``, sorted by domain, split, id) and
``manifest.json`` (per-domain sources, licences, package versions, sizes and
the sha256 of the compressed file).

Usage (needs ``apt-get`` and ``dpkg-deb``, i.e. a Debian/Ubuntu machine with
the bookworm archive configured; no root needed for ``apt-get download``)::

    python scripts/build_corpus.py                      # writes src/divmoe/data/corpus/
    python scripts/build_corpus.py --debs /tmp/debs     # reuse already downloaded .deb files
    python scripts/build_corpus.py --out /tmp/corpus    # write elsewhere

The script is deterministic: the same package versions give byte-identical
output (the versions used are recorded in ``manifest.json``; the script prints a
warning when a downloaded version differs).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import lzma
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "divmoe" / "data" / "corpus"

PACKAGES = {
    "english": "r-cran-janeaustenr",
    "spanish": "sword-text-sparv",
    "python": "libpython3.11-stdlib",
    "docs": "python3.11-doc",
    "c": "libc6-dev",
    "shell": "bash-completion",
    "pod": "perl-doc",
    "tex": "texlive-latex-base",
}
#: domains copied from the existing corpus unless --rebuild-frozen (see the module docstring)
FROZEN = ("docs", "english", "python", "spanish")
# versions the shipped corpus was built from (Debian bookworm)
EXPECTED_VERSIONS = {
    "r-cran-janeaustenr": "1.0.0-1",
    "sword-text-sparv": "2.60-1",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "libc6-dev": "2.36-9+deb12u14",
    "bash-completion": "1:2.11-6",
    "perl-doc": "5.36.0-7+deb12u3",
    "texlive-latex-base": "2022.20230122-3",
}
INFO = {
    "english": {
        "description": "Jane Austen's six completed novels (Sense and Sensibility, Pride and Prejudice, "
        "Mansfield Park, Emma, Northanger Abbey, Persuasion), Project Gutenberg texts as packaged in "
        "the R package janeaustenr; one document per chapter",
        "source": "https://cran.r-project.org/package=janeaustenr (Project Gutenberg texts)",
        "licence": "Public domain (novels published 1811-1818); janeaustenr packaging MIT",
    },
    "spanish": {
        "description": "Santa Biblia, Reina-Valera 1909 (Spanish), SWORD module spaRV1909eb; OSIS markup "
        "stripped; one document per chapter, one verse per line",
        "source": "https://ebible.org/details.php?id=spaRV1909 via Debian package sword-text-sparv",
        "licence": "Public domain",
    },
    "python": {
        "description": "CPython 3.11 standard library Python sources (test directories and generated "
        "pydoc_data excluded); one document per .py file",
        "source": "https://www.python.org/ (CPython 3.11.2 Lib/) via Debian package libpython3.11-stdlib",
        "licence": "PSF License Agreement for Python 3.11 (PSF-2.0)",
    },
    "docs": {
        "description": "reStructuredText sources of the Python 3.11 documentation; one document per .rst file",
        "source": "https://docs.python.org/3.11/ (CPython Doc/) via Debian package python3.11-doc",
        "licence": "PSF License Agreement for Python 3.11 (PSF-2.0); code examples in the docs dual-licensed PSF-2.0 / 0BSD",
    },
    "c": {
        "description": "GNU C Library 2.36 header files (/usr/include/**/*.h of libc6-dev); one document per header",
        "source": "https://sourceware.org/glibc/ via Debian package libc6-dev",
        "licence": "LGPL-2.1-or-later (GNU C Library)",
    },
    "shell": {
        "description": "bash completion scripts of the bash-completion project (completions/*, symlinks "
        "skipped); one document per script",
        "source": "https://github.com/scop/bash-completion via Debian package bash-completion",
        "licence": "GPL-2.0-or-later",
    },
    "pod": {
        "description": "Perl 5.36 core documentation in POD (pod/*.pod of perl-doc); one document per page",
        "source": "https://www.perl.org/ (perl 5.36.0 pod/) via Debian package perl-doc",
        "licence": "GPL-1.0-or-later or Artistic-1.0 (the Perl licence)",
    },
    "tex": {
        "description": "LaTeX macro sources of the LaTeX Project bundles base, tools, graphics, l3kernel, "
        "l3packages, l3backend, latex-lab (.sty .cls .def .ltx .tex); one document per file",
        "source": "https://www.latex-project.org/ (TeX Live 2022) via Debian package texlive-latex-base",
        "licence": "LPPL-1.3c (LaTeX Project Public License)",
    },
}


# --------------------------------------------------------------------------- helpers
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def fetch_packages(debs: Path, packages: list[str]) -> dict[str, Path]:
    """Return {package: extracted root}; downloads missing .deb files with apt-get."""
    debs.mkdir(parents=True, exist_ok=True)
    roots = {}
    for pkg in packages:
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
        deb = found[-1]
        root = debs / "x" / pkg
        if not root.exists():
            root.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        roots[pkg] = root
    return roots


def deb_info(debs: Path, pkg: str) -> dict:
    deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if version != EXPECTED_VERSIONS[pkg]:
        print(f"WARNING: {pkg} {version} differs from the version the shipped corpus was built "
              f"from ({EXPECTED_VERSIONS[pkg]}); output will differ", file=sys.stderr)
    return {"package": pkg, "version": version, "deb": deb.name, "deb_sha256": sha256_hex(deb.read_bytes())}


# --------------------------------------------------------------------------- R unserializer
class _RReader:
    """Minimal reader for R's XDR serialization format (versions 2 and 3)."""

    def __init__(self, data: bytes):
        self.d, self.p, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack(">i", self.d[self.p:self.p + 4])
        self.p += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        if self.d[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self.int()
        self.int()
        self.int()
        if version == 3:
            n = self.int()
            self.p += n  # skip the native encoding name

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t == 254:  # NILVALUE
            return None
        if t in (253, 252, 251, 250, 242, 241):
            return ("special", t)
        if t == 255:  # REFSXP
            i = flags >> 8
            return self.refs[(i or self.int()) - 1]
        if t == 1:  # SYMSXP
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if t in (249, 248):  # NAMESPACESXP / PACKAGESXP
            self.int()
            obj = ("ns", [self.item() for _ in range(self.int())])
            self.refs.append(obj)
            return obj
        if t == 4:  # ENVSXP
            env: dict = {}
            self.refs.append(env)
            self.int()
            for k in ("enclos", "frame", "hash", "attr"):
                env[k] = self.item()
            return env
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return ("pair", tag, car, cdr, attr)
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.p:self.p + n]
            self.p += n
            return s.decode("utf-8")
        if t in (10, 13):
            n = self.length()
            v = list(struct.unpack(f">{n}i", self.d[self.p:self.p + 4 * n]))
            self.p += 4 * n
        elif t == 14:
            n = self.length()
            v = list(struct.unpack(f">{n}d", self.d[self.p:self.p + 8 * n]))
            self.p += 8 * n
        elif t in (16, 19, 20):
            v = [self.item() for _ in range(self.length())]
        elif t == 238:  # ALTREP
            return ("altrep", self.item(), self.item(), self.item())
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        attr = self.item() if has_attr else None
        return ("vec", t, v, attr)


def _r_unserialize(raw: bytes):
    r = _RReader(raw)
    r.header()
    return r.item()


def _r_names(obj) -> list[str]:
    pl = obj[3]
    while pl is not None and pl[0] == "pair":
        if pl[1] and pl[1][1] == "names":
            return pl[2][2]
        pl = pl[3]
    raise KeyError("names")


def read_r_lazyload(base: Path) -> dict:
    """Read every object of an R lazy-load database (``base.rdx`` + ``base.rdb``)."""
    index = _r_unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    variables = index[2][_r_names(index).index("variables")]
    rdb = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, loc in zip(_r_names(variables), variables[2]):
        off, ln = loc[2]
        blob = rdb[off:off + ln]
        (size,) = struct.unpack(">I", blob[:4])
        data = zlib.decompress(blob[4:])
        if len(data) != size:
            raise ValueError(f"bad rdb entry for {name}")
        out[name] = _r_unserialize(data)
    return out


# --------------------------------------------------------------------------- domains
_CHAPTER_LINE = re.compile(r"^(CHAPTER|Chapter) ([IVXLC]+|\d+)\.?\s*$")


def english_docs(root: Path) -> list[tuple[str, str]]:
    objs = read_r_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    docs = []
    for novel in sorted(objs):
        lines = [ln if ln is not None else "" for ln in objs[novel][2]]
        chapters: list[list[str]] = [[]]
        seen_heading = False
        for ln in lines:
            if _CHAPTER_LINE.match(ln):
                if seen_heading:
                    chapters.append([])
                seen_heading = True  # front matter stays with chapter 1
            chapters[-1].append(ln)
        for i, ch in enumerate(chapters, 1):
            text = normalise("\n".join(ch)).strip("\n") + "\n"
            docs.append((f"austen/{novel}/{i:03d}", text))
    return docs


def _read_sword_entries(moddir: Path) -> list[str]:
    entries = []
    for testament in ("ot", "nt"):
        bzs = (moddir / f"{testament}.bzs").read_bytes()
        bzv = (moddir / f"{testament}.bzv").read_bytes()
        bzz = (moddir / f"{testament}.bzz").read_bytes()
        blocks = [struct.unpack("<III", bzs[i:i + 12]) for i in range(0, len(bzs), 12)]
        cache: dict[int, bytes] = {}
        for i in range(0, len(bzv), 10):
            block, offset, size = struct.unpack("<IIH", bzv[i:i + 10])
            if size == 0:
                continue
            if block not in cache:
                start, csize, _ = blocks[block]
                cache[block] = zlib.decompress(bzz[start:start + csize])
            entries.append(cache[block][offset:offset + size].decode("utf-8"))
    return entries


_TAG = re.compile(r"<[^>]*>")
_CH_START = re.compile(r'<chapter\b[^>]*\bsID="([^"]+)"')
_BOOK_START = re.compile(r'<div\b[^>]*type="book"')


def _osis_to_text(osis: str) -> str:
    lines = []
    for ln in osis.split("\n"):
        ln = re.sub(r"\s+", " ", html.unescape(_TAG.sub("", ln))).strip()
        if ln:
            lines.append(ln)
    return "\n".join(lines) + "\n"


def sword_docs(moddir: Path, prefix: str) -> list[tuple[str, str]]:
    # One entry per verse (or book/chapter heading); join with newlines, then cut
    # before each book start and each chapter start.
    stream = "\n".join(_read_sword_entries(moddir))
    cuts = sorted({m.start() for m in _CH_START.finditer(stream)} | {m.start() for m in _BOOK_START.finditer(stream)})
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    docs, pending = [], ""
    for piece in pieces:
        m = _CH_START.search(piece)
        if m is None:  # book heading or module header: prepend to the next chapter
            pending += piece
            continue
        text = _osis_to_text(pending + piece)
        pending = ""
        docs.append((f"{prefix}/{m.group(1)}", text))
    return docs


MAX_FILE_BYTES = 60_000


def _text_of(path: Path, too_small) -> str | None:
    """The file's normalised UTF-8 text, or None when ``too_small(raw)``, when it is over
    MAX_FILE_BYTES, or when it does not decode."""
    raw = path.read_bytes()
    if too_small(raw) or len(raw) > MAX_FILE_BYTES:
        return None
    try:
        return normalise(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def python_docs(root: Path) -> list[tuple[str, str]]:
    lib = root / "usr/lib/python3.11"
    docs = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if path.is_symlink() or not path.is_file():
            continue
        if set(rel.parts[:-1]) & {"test", "tests", "idle_test", "pydoc_data", "lib-dynload"}:
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        text = _text_of(path, lambda raw: not raw.strip())
        if text is not None:
            docs.append((f"cpython-3.11/Lib/{rel.as_posix()}", text))
    return docs


def rst_docs(root: Path) -> list[tuple[str, str]]:
    src = root / "usr/share/doc/python3.11/html/_sources"
    docs = []
    for path in sorted(src.rglob("*.rst.txt")):
        rel = path.relative_to(src)
        if path.is_symlink() or not path.is_file():
            continue
        text = _text_of(path, lambda raw: len(raw) < 200)
        if text is not None:
            docs.append((f"cpython-3.11/Doc/{rel.as_posix()[:-len('.txt')]}", text))
    return docs


#: domain -> (folder inside the package, file suffixes, id prefix, folders below it to keep or None)
FILE_DOMAINS = {
    "c": ("usr/include", (".h",), "glibc-2.36/include", None),
    "shell": ("usr/share/bash-completion/completions", ("",), "bash-completion-2.11/completions", None),
    "pod": ("usr/share/perl/5.36.0/pod", (".pod",), "perl-5.36/pod", None),
    "tex": ("usr/share/texlive/texmf-dist/tex/latex", (".sty", ".cls", ".def", ".ltx", ".tex"),
            "texlive-2022/tex/latex",
            ("base", "tools", "graphics", "l3kernel", "l3packages", "l3backend", "latex-lab")),
}


def file_docs(root: Path, domain: str) -> list[tuple[str, str]]:
    """One document per regular UTF-8 file (not empty, <= MAX_FILE_BYTES) of a FILE_DOMAINS entry."""
    folder, suffixes, prefix, keep = FILE_DOMAINS[domain]
    base = root / folder
    docs = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if path.is_symlink() or not path.is_file() or not rel.name.endswith(suffixes):
            continue
        if keep is not None and rel.parts[0] not in keep:
            continue
        text = _text_of(path, lambda raw: not raw.strip())
        if text is not None:
            docs.append((f"{prefix}/{rel.as_posix()}", text))
    return docs


def frozen_records(base: Path) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """The JSON lines and manifest entries of the FROZEN domains of the corpus in ``base``,
    verbatim (the file is checked against its manifest's sha256 first)."""
    manifest = json.loads((base / "manifest.json").read_text(encoding="utf-8"))
    compressed = (base / "corpus.jsonl.xz").read_bytes()
    if sha256_hex(compressed) != manifest["files"]["corpus.jsonl.xz"]["sha256"]:
        raise SystemExit(f"{base}/corpus.jsonl.xz does not match its manifest; cannot copy the frozen domains")
    lines: dict[str, list[str]] = {d: [] for d in FROZEN}
    for line in lzma.decompress(compressed).decode("utf-8").splitlines():
        if line and json.loads(line)["domain"] in FROZEN:
            lines[json.loads(line)["domain"]].append(line)
    missing = [d for d in FROZEN if not lines[d]]
    if missing:
        raise SystemExit(f"{base}/corpus.jsonl.xz lacks the frozen domain(s) {missing}; use --rebuild-frozen")
    return lines, {d: manifest["domains"][d] for d in FROZEN}


# --------------------------------------------------------------------------- selection + split
def select_and_split(docs, target_bytes: int, val_fraction: float, min_val_bytes: int):
    ids = [d[0] for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate document ids")
    by_sel = sorted(docs, key=lambda d: sha256_hex(b"select:" + d[0].encode()))
    chosen, total = [], 0
    for doc in by_sel:
        if total >= target_bytes:
            break
        chosen.append(doc)
        total += nbytes(doc[1])
    want_val = max(val_fraction * total, min_val_bytes)
    val_ids, vbytes = set(), 0
    for doc in sorted(chosen, key=lambda d: sha256_hex(b"split:" + d[0].encode())):
        if vbytes >= want_val:
            break
        val_ids.add(doc[0])
        vbytes += nbytes(doc[1])
    return [(i, t, "val" if i in val_ids else "train") for i, t in sorted(chosen)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--debs", type=Path, default=None, help="directory holding/receiving the .deb files")
    ap.add_argument("--target-bytes", type=int, default=1_800_000, help="raw UTF-8 bytes per domain")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--min-val-bytes", type=int, default=64_000)
    ap.add_argument("--frozen-from", type=Path, default=DEFAULT_OUT,
                    help=f"corpus folder the frozen domains ({', '.join(FROZEN)}) are copied from")
    ap.add_argument("--rebuild-frozen", action="store_true",
                    help="rebuild the frozen domains from their packages instead of copying them")
    args = ap.parse_args(argv)

    frozen_lines, frozen_info = ({}, {}) if args.rebuild_frozen else frozen_records(args.frozen_from)
    packages = {d: p for d, p in PACKAGES.items() if d not in frozen_lines}
    with tempfile.TemporaryDirectory() as tmp:
        debs = args.debs or Path(tmp)
        roots = fetch_packages(debs, sorted(set(packages.values())))
        builders = {
            "english": lambda: english_docs(roots["r-cran-janeaustenr"]),
            "spanish": lambda: sword_docs(roots["sword-text-sparv"]
                                          / "usr/share/sword/modules/texts/ztext/spaRV1909eb", "spaRV1909"),
            "python": lambda: python_docs(roots["libpython3.11-stdlib"]),
            "docs": lambda: rst_docs(roots["python3.11-doc"]),
            **{d: (lambda d=d: file_docs(roots[PACKAGES[d]], d)) for d in FILE_DOMAINS},
        }
        raw = {d: builders[d]() for d in packages}
        pkg_info = {d: deb_info(debs, p) for d, p in packages.items()}

    lines, domains = [], {}
    for domain in sorted(set(raw) | set(frozen_lines)):
        if domain in frozen_lines:
            lines += frozen_lines[domain]
            domains[domain] = frozen_info[domain]
            continue
        docs = select_and_split(raw[domain], args.target_bytes, args.val_fraction, args.min_val_bytes)
        stats = {"train": [0, 0], "val": [0, 0]}
        for doc_id, text, split in docs:
            stats[split][0] += 1
            stats[split][1] += nbytes(text)
        for split in ("train", "val"):
            for doc_id, text, s in docs:
                if s == split:
                    lines.append(json.dumps({"id": doc_id, "domain": domain, "split": split, "text": text},
                                            ensure_ascii=False, sort_keys=True))
        domains[domain] = {
            **INFO[domain],
            **pkg_info[domain],
            "available_documents": len(raw[domain]),
            "available_bytes": sum(nbytes(t) for _, t in raw[domain]),
            "train_docs": stats["train"][0],
            "train_bytes": stats["train"][1],
            "val_docs": stats["val"][0],
            "val_bytes": stats["val"][1],
        }
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    compressed = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                               preset=9 | lzma.PRESET_EXTREME)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corpus.jsonl.xz").write_bytes(compressed)
    manifest = {
        "name": "divmoe-embedded-corpus",
        "format": "xz-compressed JSON lines: {id, domain, split, text}; text is UTF-8 plain text",
        "built_by": "scripts/build_corpus.py",
        "selection": {
            "target_bytes_per_domain": args.target_bytes,
            "val_fraction": args.val_fraction,
            "min_val_bytes": args.min_val_bytes,
            "rule": "documents ordered by sha256('select:'+id) until target bytes; validation documents "
                    "ordered by sha256('split:'+id) until max(val_fraction*bytes, min_val_bytes)",
        },
        "domains": domains,
        "total_raw_bytes": sum(d["train_bytes"] + d["val_bytes"] for d in domains.values()),
        "files": {"corpus.jsonl.xz": {"bytes": len(compressed), "sha256": sha256_hex(compressed),
                                      "uncompressed_bytes": len(payload),
                                      "uncompressed_sha256": sha256_hex(payload)}},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    for domain, d in domains.items():
        print(f"{domain:8s} train {d['train_docs']:5d} docs {d['train_bytes']:9d} B   "
              f"val {d['val_docs']:4d} docs {d['val_bytes']:7d} B")
    print(f"total raw {manifest['total_raw_bytes']} B, compressed {len(compressed)} B -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
