"""The documentation under docs/ against the code: runnable snippets, a complete reference, links
that resolve, and no pointers outside the repository.

* Every ```python block of docs/getting-started.md runs, in order, in one namespace (as a reader
  would paste them into one session), in a temporary working directory.
* docs/reference.md names every public name: everything in ``fnlayers.__all__`` and in the
  ``__all__`` of each public submodule, as inline code.
* Every relative link of docs/*.md, benchmarks/results/README.md and CHANGELOG.md points to an
  existing file.
* No docs file points outside the repository or to the development history's private notes.
"""

import re
import types
from pathlib import Path

import pytest

import fnlayers

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LINKED = [
    *sorted(DOCS.glob("*.md")),
    ROOT / "benchmarks" / "results" / "README.md",
    ROOT / "CHANGELOG.md",
]

# Paths outside the repository, private notes that are not in it, and the development history's
# rounds of work: none belongs in a user's manual.
# (Spelled in pieces, so that this file does not itself match a search for those names.)
_NOTES = ("CAFFE_" + "SEMANTICS", "DESIGN" + r"\.md", "PERF_" + "NOTES", "STYLE" + r"\.md")
_SHARED = ("shared/" + "background", "shared/" + "caffe-models")
_ROUNDS = ("ses" + "sion [0-9]", "fifth ses" + "sion", "fourth ses" + "sion")
FORBIDDEN = re.compile(
    "|".join((*_ROUNDS, *_NOTES, "CAFFE_" + "INTEROP", r"\.\./" + "shared", *_SHARED)),
    re.IGNORECASE,
)


def _python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_getting_started_snippets_run(tmp_path, monkeypatch):
    blocks = _python_blocks((DOCS / "getting-started.md").read_text())
    assert len(blocks) >= 5, "getting-started.md lost its python snippets"
    monkeypatch.chdir(tmp_path)  # snippets write checkpoints and histories to the working dir
    namespace = {"__name__": "getting_started"}
    for i, block in enumerate(blocks):
        code = compile(block, f"docs/getting-started.md, python block {i + 1}", "exec")
        exec(code, namespace)


def _public_names():
    names = [(name, None) for name in fnlayers.__all__]
    for name in fnlayers.__all__:
        module = getattr(fnlayers, name)
        if isinstance(module, types.ModuleType):
            names += [(member, name) for member in module.__all__]
    return names


@pytest.mark.parametrize(("name", "module"), _public_names())
def test_reference_names_every_public_name(name, module):
    text = (DOCS / "reference.md").read_text()
    prefix = r"(?:(?:fl|fnlayers)\.)?" + (rf"(?:{module}\.)?" if module else "")
    pattern = "`" + prefix + re.escape(name) + r"[`(.\[ ]"
    where = f"fl.{module}.{name}" if module else f"fl.{name}"
    assert re.search(pattern, text), f"docs/reference.md does not mention {where}"


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = doc.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_docs_stay_inside_the_repository():
    files = [*DOCS.rglob("*.md"), *ROOT.glob("benchmarks/**/*.md"), ROOT / "CHANGELOG.md"]
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "docs point outside the repository:\n" + "\n".join(hits)
