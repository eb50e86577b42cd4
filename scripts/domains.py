"""The multi-domain evaluation suite of the quality benchmark: one plain-text file per domain, built offline and
deterministically from text installed on the machine, none of which mfakit calibrates or trains on.

    python scripts/domains.py OUT --model SMOLLM2_FOLDER      # every domain into OUT/<domain>.txt + manifest.json

Domains, and what decisions they may inform:
    development (methods and defaults are chosen on these):
        python-rst   Python's own documentation in reST (howto, tutorial, whatsnew, faq, ...; not the reference and
                     library chapters that pydoc_data.topics is generated from), from Debian's python3.11-doc
        python-code  the standard library's source, its held-out modules (mfakit's builtin:stdlib evaluation part)
        perl         Perl's POD manuals and FAQs (perl-doc)
        generated    text sampled from the model itself (temperature 1, from the start token)
    report (never used for a decision; the benchmark's headline):
        postgresql   the PostgreSQL 15 manual, HTML to text (postgresql-doc-15)
        git          Git's manuals in asciidoc (git-doc)
        fortunes     quotations and literature (fortunes)

Every corpus is split as mfakit splits its built-in corpora: documents sorted by name, index % 5 == 2 go to the
evaluation side (the others could calibrate a user's own conversion without touching these files). A domain's file
takes evaluation-side documents in a seeded order, the head of each (2,048 tokens at most), until it holds 20,000
tokens of the model's tokenizer. The Debian packages are installed by `make bench-quality`.
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import random
import re
import sysconfig
from collections.abc import Callable
from pathlib import Path

from mfakit.texts import stdlib_modules

TARGET = 20_000  # tokens per domain file
DOC_CAP = 2_048  # a long document contributes its head only, so that 8,192 tokens span several documents
SEED = 20240601
SHINGLE = 12
MAX_PYDOC_OVERLAP = 0.05  # python-rst documents sharing more of their 12-word shingles with pydoc topics are dropped
PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
PY_DOC_DIRS = ["howto", "tutorial", "whatsnew", "faq", "using", "extending", "installing", "distributing"]
PERL_POD = Path("/usr/share/perl/5.36.0/pod")
PG_HTML = Path("/usr/share/doc/postgresql-doc-15/html")
GIT_DOC = Path("/usr/share/doc/git-doc")
FORTUNES = Path("/usr/share/games/fortunes")
DEVELOPMENT = ("python-rst", "python-code", "perl", "generated")
REPORT = ("postgresql", "git", "fortunes")
Document = tuple[str, Callable[[], str]]  # a name and a reader of the document's text


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: block elements become line breaks, navigation headers and footers go."""

    BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "pre", "br", "table", "dt", "dd", "dl"}
    BLOCK |= {"ul", "ol", "blockquote", "hr", "title"}
    SKIP_TAGS = {"script", "style", "head"}
    SKIP_DIV_CLASSES = {"navheader", "navfooter"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.stack: list[tuple[str, bool]] = []
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        skipping = tag in self.SKIP_TAGS or (tag == "div" and classes & self.SKIP_DIV_CLASSES)
        if tag in ("br", "hr", "img", "meta", "link", "input"):  # void elements
            if not self.skip and tag in ("br", "hr"):
                self.out.append("\n")
            return
        self.stack.append((tag, bool(skipping)))
        self.skip += bool(skipping)
        self.pre += tag == "pre"
        if not self.skip and tag in self.BLOCK:
            self.out.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "table", "dl") else "\n")

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):  # tolerates sloppy HTML: pop to the matching tag
            if self.stack[i][0] == tag:
                for t, skipped in self.stack[i:]:
                    self.skip -= skipped
                    self.pre -= t == "pre"
                del self.stack[i:]
                break
        if not self.skip and tag in self.BLOCK:
            self.out.append("\n")
        if not self.skip and tag in ("td", "th"):
            self.out.append(" ")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(source: str) -> str:
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    lines = "".join(parser.out).split("\n")
    return clean("\n".join(line.strip() if not line.startswith("  ") else line.rstrip() for line in lines))


def files_as_documents(files: list[Path], root: Path, read: Callable[[Path], str]) -> list[Document]:
    return [(str(p.relative_to(root)), lambda p=p: read(p)) for p in files]


def python_rst() -> list[Document]:
    files = sorted(p for d in PY_DOC_DIRS for p in (PY_DOCS / d).rglob("*.rst.txt"))
    return files_as_documents(files, PY_DOCS, lambda p: clean(read_text(p)))


def python_code() -> list[Document]:
    """The standard library's modules in mfakit's own order, so that the evaluation side here is exactly the
    held-out part of builtin:stdlib and builtin:docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return files_as_documents(stdlib_modules(), root, lambda p: clean(read_text(p)))


def fortunes() -> list[Document]:
    docs = []
    for f in sorted(FORTUNES.iterdir()):
        if not f.is_file() or f.suffix in (".dat", ".u8"):
            continue
        entries = [clean(e) for e in re.split(r"(?m)^%\s*$", read_text(f))]
        docs += [(f"{f.name}/{k:05d}", e) for k, e in enumerate(e for e in entries if e.strip())]
    return [(name, lambda t=text: t) for name, text in sorted(docs)]


SOURCES: dict[str, Callable[[], list[Document]]] = {
    "python-rst": python_rst,
    "python-code": python_code,
    "perl": lambda: files_as_documents(sorted(PERL_POD.glob("*.pod")), PERL_POD, lambda p: clean(read_text(p))),
    "postgresql": lambda: files_as_documents(
        sorted(PG_HTML.glob("*.html")), PG_HTML, lambda p: html_to_text(read_text(p))
    ),
    "git": lambda: files_as_documents(sorted(GIT_DOC.glob("*.txt")), GIT_DOC, lambda p: clean(read_text(p))),
    "fortunes": fortunes,
}
SEEDS = {"python-rst": 1, "python-code": 2, "perl": 3, "postgresql": 4, "git": 5, "fortunes": 6}


class Tokens:
    """Token counts of the model's tokenizer (the sizes are in the model's tokens)."""

    def __init__(self, model: Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"])

    def head(self, text: str, cap: int) -> str:
        """About the first `cap` tokens of a document, cut at a line boundary (the whole text when shorter)."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoded["input_ids"]) <= cap:
            return text
        end = encoded["offset_mapping"][cap][0]
        cut = text.rfind("\n", 0, end)
        return text[: cut if cut > end // 2 else end].rstrip()


def evaluation_side(docs: list[Document]) -> list[Document]:
    return [d for i, d in enumerate(docs) if i % 5 == 2]


def select(docs: list[Document], tokens: Tokens, seed: int, exclude: set[str]) -> tuple[list[str], list[str]]:
    """Documents in a seeded order, each cut to DOC_CAP tokens, until the joined text holds TARGET tokens."""
    order = list(docs)
    random.Random(seed).shuffle(order)
    chosen, texts, total = [], [], 0
    for name, read in order:
        text = read()
        if name in exclude or not text.strip():
            continue
        text = tokens.head(text, DOC_CAP)
        chosen.append(name)
        texts.append(text)
        total += tokens.count(text) + 1  # the blank line between documents, about one token
        if total >= TARGET:
            total = tokens.count("\n\n".join(texts))
            if total >= TARGET:
                break
    return chosen, texts


def shingles(text: str) -> set[int]:
    words = text.split()
    return {hash(tuple(words[i : i + SHINGLE])) for i in range(max(0, len(words) - SHINGLE + 1))}


def pydoc_overlap(docs: list[Document]) -> set[str]:
    """python-rst documents that share more than MAX_PYDOC_OVERLAP of their shingles with pydoc_data.topics (text
    mfakit calibrates on by default)."""
    from pydoc_data.topics import topics

    seen = set().union(*(shingles(t) for t in topics.values()))
    drop = set()
    for name, read in docs:
        own = shingles(read())
        if len(own & seen) / max(1, len(own)) > MAX_PYDOC_OVERLAP:
            drop.add(name)
    return drop


def generated(model: Path, tokens: Tokens, seed: int = 1234) -> tuple[list[str], list[str]]:
    """Text sampled from the model (temperature 1, top-k 0, top-p 1, from its start token), 512 new tokens a
    sequence in batches of 8, until TARGET tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from mfakit.finetune.dataset import PURE_SAMPLING

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    start = m.config.bos_token_id if m.config.bos_token_id is not None else m.config.eos_token_id
    names, texts, batch = [], [], 0
    while tokens.count("\n\n".join(texts)) < TARGET:
        prompt = torch.full((8, 1), start, dtype=torch.long)
        with torch.no_grad():
            out = m.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                **PURE_SAMPLING,
                max_new_tokens=512,
                pad_token_id=m.config.eos_token_id,
            )
        for row in out[:, 1:]:
            text = clean(tokens.tokenizer.decode(row, skip_special_tokens=True))
            if text.strip():
                names.append(f"batch{batch:03d}/seq{len(names)}")
                texts.append(text)
        batch += 1
    return names, texts


def build(out: Path, model: Path, domains: tuple[str, ...]) -> dict:
    """Write OUT/<domain>.txt for every domain (kept when already there) and return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    tokens = Tokens(model)
    manifest = {}
    for name in domains:
        path = out / f"{name}.txt"
        if not path.exists():
            if name == "generated":
                chosen, texts = generated(model, tokens)
            else:
                docs = evaluation_side(SOURCES[name]())
                exclude = pydoc_overlap(docs) if name == "python-rst" else set()
                chosen, texts = select(docs, tokens, SEED + SEEDS[name], exclude)
            path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
            (out / f"{name}.documents.json").write_text(json.dumps(chosen, indent=1))
        text = path.read_text(encoding="utf-8")
        manifest[name] = {
            "set": "development" if name in DEVELOPMENT else "report",
            "tokens": tokens.count(text.rstrip("\n")),
            "characters": len(text),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", type=Path, required=True, help="the model whose tokenizer sizes the files")
    parser.add_argument("--domains", nargs="+", default=[*DEVELOPMENT, *REPORT])
    args = parser.parse_args()
    for name, entry in build(args.out, args.model, tuple(args.domains)).items():
        print(f"{name:12s} {entry['set']:12s} {entry['tokens']:7,d} tokens  sha256 {entry['sha256'][:12]}")


if __name__ == "__main__":
    main()
