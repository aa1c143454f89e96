"""The README runs and says what the code and the committed records say: its usage example runs as written,
every command line it shows parses with the CLI it names, its parameter table matches the models, and its
CPU tables match the records in benchmarks/results/ they cite."""
import json
import re
import shlex
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [README, RESULTS / "README.md", ROOT / "csrc" / "README.md"]


def test_usage_example_runs():
    block = re.search(r"## Use\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["f"].shape == (2, 96, 28, 28)
    assert ns["y"].shape == (2, 96, 13, 17)
    assert ns["logits"].shape == (1, 7) and torch.isfinite(ns["logits"]).all()


def test_readme_test_command_is_what_ci_runs():
    cmd = re.search(r"(python -m pytest[^\n`]*)", README.read_text()).group(1).strip()
    assert cmd in (README.parent / ".ci" / "run").read_text()


# ------------------------------------------------------------------------------------------ command lines

def _code_lines(text: str):
    """The lines of the ```bash blocks (backslash continuations joined, comments dropped)."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line


def _inline_spans(text: str):
    """The `...` spans of the prose (code blocks removed), newlines inside a span joined."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]


FB_CALL = re.compile(r"(?:^|\s)fusionblocks ((?:info|summary|bench|train|evaluate|predict|export)\b.*)")
SCRIPT_CALL = re.compile(r"(?:python3?\s+)?(benchmarks/\w+\.(?:py|sh))\b(.*)")


def _fb_calls():
    for doc in DOCS:
        text = doc.read_text()
        for line in _code_lines(text):
            m = FB_CALL.search(line)
            if m:
                yield str(doc.relative_to(ROOT)), m.group(1), True
        for span in _inline_spans(text):
            m = FB_CALL.search(span)
            if m:
                yield str(doc.relative_to(ROOT)), m.group(1), False


def _subparsers():
    from fusionblocks.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices


def test_readme_command_lines_parse(capsys):
    """Every `fusionblocks ...` line of a code block parses as written (flags, choices, number types, required
    options); every one in the prose at least names options its subcommand has."""
    parser, subs = _subparsers()
    calls = list(_fb_calls())
    assert len(calls) > 20
    bad = []
    for doc, call, whole in calls:
        cmd = call.split()[0]
        if whole:
            try:
                parser.parse_args(shlex.split(call))
            except SystemExit:
                bad.append(f"{doc}: fusionblocks {call}: {capsys.readouterr().err.strip().splitlines()[-1]}")
        else:
            known = set(subs[cmd]._option_string_actions)
            bad += [f"{doc}: fusionblocks {call}: {f} is no option of `fusionblocks {cmd}`"
                    for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", call) if f not in known]
    assert not bad, "\n".join(bad)


def test_readme_script_options_exist():
    """`python benchmarks/X.py --opt` (and gpu_check.sh, which passes its options to gpu_check.py): every option
    named is one the script defines."""
    bad, n = [], 0
    for doc in DOCS:
        text = doc.read_text()
        for line in list(_code_lines(text)) + _inline_spans(text):
            m = SCRIPT_CALL.search(line)
            if not m:
                continue
            script = ROOT / m.group(1).replace("gpu_check.sh", "gpu_check.py")
            assert script.exists(), f"{doc.relative_to(ROOT)}: {m.group(1)} does not exist"
            source = script.read_text()
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2).split("#")[0]):
                n += 1
                if f'"{flag}"' not in source and f"'{flag}'" not in source:
                    bad.append(f"{doc.relative_to(ROOT)}: {m.group(0).strip()}: {flag} is no option of {m.group(1)}")
    assert n > 10 and not bad, "\n".join(bad)


# flags of other tools that the README's commands use
OTHER_TOOLS = {"--no-build-isolation",  # pip
               "--dist",  # pytest-xdist
               "--nproc-per-node",  # torchrun
               "--inplace",  # setup.py build_ext
               "--pretrained", "--pretrained-path"}  # timm's train.py


def test_every_option_the_readme_names_exists():
    """Any `--option` in the README (prose included) is one of `fusionblocks`' subcommands or of a script in
    benchmarks/, or one of the few other tools' flags it names."""
    _, subs = _subparsers()
    known = set(OTHER_TOOLS).union(*(set(p._option_string_actions) for p in subs.values()))
    for script in (ROOT / "benchmarks").glob("*.py"):
        known |= set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", script.read_text()))
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", README.read_text()))
    assert len(named) > 30 and not named - known, sorted(named - known)


# --------------------------------------------------------------------------------------- parameter table

def test_parameter_table_matches_the_models():
    from fusionblocks import create_model

    text = README.read_text()
    classes = int(re.search(r"Parameter counts \(`num_classes=(\d+)`\)", text).group(1))
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+) \| ([\d,]+|—) \|", text, re.M)
    assert {r[0] for r in rows} >= {"hifuse_tiny", "hifuse_small", "hifuse_base", "hemf", "hatr_resnet50",
                                   "hatr_conv2d"}
    for name, ours, official in rows:
        with torch.device("meta"):  # sizes only: no memory, no initialization
            model = create_model(name, num_classes=classes)
        count = sum(p.numel() for p in model.parameters())
        assert f"{count:,}" == ours, (name, count, ours)
        if official != "—":
            assert f"{count + model.official_unused_params():,}" == official, name


# ----------------------------------------------------------------------------------- performance tables

def _table_after(text: str, anchor: str):
    """The body rows (lists of cells) of the first Markdown table after ``anchor``."""
    rest = text[text.index(anchor):]
    lines = rest[rest.index("\n|"):].strip().splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in line.strip("|").split("|")])
    return rows


def _records(name: str):
    with open(RESULTS / name) as f:
        return json.load(f)


def _case(label: str):
    """README case label -> (op, shape fields it fixes)."""
    m = re.fullmatch(r"decomposed (\d+)², D (\d+)", label)
    if m:
        return "decay_attention_decomposed", {"H": int(m[1]), "D": int(m[2])}
    m = re.fullmatch(r"window (\d+)², (\d+) heads, shift (\d+)", label)
    if m:
        return "window_attention", {"H": int(m[1]), "heads": int(m[2]), "shift": int(m[3])}
    m = re.fullmatch(r"full decay (\d+)²", label)
    assert m, label
    return "decay_attention_full", {"H": int(m[1])}


def _one(records, label: str, pass_: str, impl: str):
    op, shape = _case(label)
    found = [r for r in records if r["op"] == op and r["pass"] == pass_ and r["impl"] == impl
             and all(r["shape"].get(k) == v for k, v in shape.items())]
    assert len(found) == 1, (label, pass_, impl, len(found))
    return found[0]


def test_cpu_kernel_table_matches_its_records():
    text = README.read_text()
    rows = _table_after(text, "**CPU, per op, at the shapes the models call**")
    one = _records("cpu_kernels-cpu-amd-epyc-2-cores-avx2-1thread.json")
    two = _records("cpu_kernels-cpu-amd-epyc-2-cores-avx2-2threads.json")
    assert len(rows) == 28
    for case, pass_, ref_ms, cpp_ms, x1, x2, ref_mb, cpp_mb in rows:
        ref, cpp = _one(one, case, pass_, "reference"), _one(one, case, pass_, "cpp")
        ref2, cpp2 = _one(two, case, pass_, "reference"), _one(two, case, pass_, "cpp")
        assert [ref_ms, cpp_ms, x1, x2, ref_mb, cpp_mb] == [
            f"{ref['ms']:.2f}", f"{cpp['ms']:.2f}", f"{ref['ms'] / cpp['ms']:.2f}x", f"{ref2['ms'] / cpp2['ms']:.2f}x",
            f"{ref['peak_mem_mb']:.1f}", f"{cpp['peak_mem_mb']:.1f}"], (case, pass_)


def test_avx512_table_matches_its_records():
    text = README.read_text()
    rows = _table_after(text, "**CPU with AVX-512: every ISA variant and the automatic choice side by side**")
    base = "cpu_kernels-cpu-amd-epyc-family-25-model-17-2-cores-"
    one = {isa: _records(f"{base}{isa}-1thread.json") for isa in ("avx512", "avx2", "default")}
    two = {isa: _records(f"{base}{isa}-2threads.json") for isa in ("avx512", "avx2")}

    def auto(records, case, pass_):
        r = _one(records, case, pass_, "auto")
        variant = re.fullmatch(r"cpp\[(\w+)\]", r["chosen"]).group(1)
        return f"{r['ms']:.2f} ({variant})"

    assert len(rows) == 28
    for case, pass_, ref_ms, x512, x2, xdef, auto_cell, two_cell in rows:
        got = [f"{_one(one['avx512'], case, pass_, 'reference')['ms']:.2f}"]
        got += [f"{_one(one[isa], case, pass_, 'cpp')['ms']:.2f}" for isa in ("avx512", "avx2", "default")]
        got.append(auto(one["avx512"], case, pass_))
        got.append(", ".join([f"{_one(two['avx512'], case, pass_, 'reference')['ms']:.2f}"]
                             + [f"{_one(two[isa], case, pass_, 'cpp')['ms']:.2f}" for isa in ("avx512", "avx2")]
                             + [auto(two["avx512"], case, pass_)]))
        assert [ref_ms, x512, x2, xdef, auto_cell, two_cell.replace("**", "")] == got, (case, pass_)


def test_model_table_matches_its_records():
    rows = _table_after(README.read_text(), "**CPU, whole models**")
    assert len(rows) == 8
    for model, threads, pass_, ref_cell, cpp_ips, auto_ips, ratio, mem in rows:
        recs = {r["impl"]: r for r in _records(f"model-{model.strip('`')}-cpu-amd-epyc-2-cores.json")
                if r["threads"] == int(threads) and r["pass"] == ("fwd" if pass_ == "forward" else "train")}
        ref, cpp, auto = recs["reference"], recs["cpp"], recs["auto"]
        assert [ref_cell, cpp_ips, auto_ips, ratio, mem] == [
            f"{ref['img_per_s']:.2f} ({ref['ms']:.0f})", f"{cpp['img_per_s']:.2f}", f"{auto['img_per_s']:.2f}",
            f"{ref['ms'] / auto['ms']:.2f}x", f"{ref['peak_mem_mb']:.0f} / {auto['peak_mem_mb']:.0f}",
        ], (model, threads, pass_)


def test_results_files_named_in_the_readme_exist():
    """Every committed result file the README names (`benchmarks/results/<file>`, a brace list expanded) exists;
    patterns (`{device}`, `<cpu>`) are left alone."""
    names = [n for n in re.findall(r"benchmarks/results/([\w.{},<>-]+\.(?:md|json|txt))", README.read_text())
             if "{device}" not in n and "<" not in n]
    assert names
    missing = []
    for name in names:
        m = re.search(r"\{([\w,-]+)\}", name)
        for path in ([name.replace(m.group(0), alt) for alt in m.group(1).split(",")] if m else [name]):
            if not (RESULTS / path).exists():
                missing.append(path)
    assert not missing, missing
