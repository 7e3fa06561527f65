"""The README says what the code does: its set-up commands, options,
metric names and links hold."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from shardvu import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_the_two_setup_commands_are_there():
    assert "pip install -e . && shardvu bench" in README
    assert "pip install -e '.[test]' && python3 -m pytest" in README


def test_every_option_in_the_options_table_exists():
    section = README[README.index("## Options"):README.index("## Operations")]
    documented = set(re.findall(r"`(--[a-z-]+)", section))
    helptext = subprocess.run([sys.executable, "-m", "shardvu", "run", "--help"],
                              capture_output=True, text=True, timeout=60).stdout
    assert documented and all(opt in helptext for opt in documented), documented
    offered = set(re.findall(r"(--[a-z][a-z-]+)", helptext)) - {"--help", "--socket"}
    assert offered <= documented, offered - documented     # and the table leaves none out


def test_every_metric_in_the_readme_is_exported():
    section = README[README.index("### Prometheus"):README.index("### systemd")]
    documented = set(re.findall(r"`(shardvu_[a-z_]+)", section))
    snap = {"name": "x", "queues": [{"index": 0, "direction": "rx"}]}
    exported = {s.name for fam in metrics.SnapshotCollector(lambda: snap).collect()
                for s in fam.samples}
    assert documented == exported, (documented ^ exported)


def test_links_resolve():
    for doc in ("README.md", "docs/api.md", "docs/perf/HISTORY.md", "docs/tutorial.md"):
        text = open(os.path.join(ROOT, doc)).read()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if target.startswith("http"):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
            assert os.path.exists(path), (doc, target)


def test_history_keeps_the_earlier_runs():
    history = open(os.path.join(ROOT, "docs", "perf", "HISTORY.md")).read()
    for marker in ("**Run M**", "**Run J**", "bench/wakeup.py --samples 200", "bench/memory.py --queues 8",
                   "bench/qemu_compare.py --queues 1,2", "| loop | 64 | 8 | 0.45 [0.448–0.484]"):
        assert marker in history, marker


def test_tutorial_commands_use_existing_options():
    """The tutorial was run as written; its shardvu commands must keep working."""
    text = open(os.path.join(ROOT, "docs", "tutorial.md")).read()
    helptext = subprocess.run([sys.executable, "-m", "shardvu", "run", "--help"],
                              capture_output=True, text=True, timeout=60).stdout
    lines = [ln for ln in text.splitlines()
             if ln.lstrip("$ ").startswith("shardvu-net") or ln.startswith("    --name")]
    used = set(re.findall(r"(--[a-z][a-z-]+)", "\n".join(lines)))
    assert {"--socket-path", "--queues", "--port", "--name", "--metrics"} <= used
    assert all(opt in helptext for opt in used), used
    assert "[restart.md](restart.md)" in text
