"""Every command in README.md and docs/*.md runs as written (a user copies them): each
fenced shell block is read (backslash continuations joined, comments dropped); a
`phoclip-*` command, `python launch/X.py` / `sharding/make_shards.py`, the script under
`torchrun` or `deepspeed` (their own flags checked too), `sbatch` scripts and
`make TARGET` must exist, and the entry point must accept every flag and every
`key=value` config override the command uses. Placeholders (`$OUT`, `...`) are allowed.
Nothing is run: the entry points' own parsers are asked, in this process."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT
from test_cli import entry_parser, installed_commands

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]) if (ROOT / "docs").is_dir() else [ROOT / "README.md"]
SHELL = {"bash", "sh", "shell", "console", "zsh"}
TRAIN_TARGET = "phoclip_cli.train:main"
SCRIPT_TARGETS = {"launch/train_ddp.py": TRAIN_TARGET, "launch/train_deepspeed.py": TRAIN_TARGET}


def shell_lines(md: Path) -> list[tuple[int, str]]:
    """(line number, command) of each fenced shell block's commands, continuations joined."""
    out, lang, buf, start = [], None, "", 0
    for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```\s*(\S*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1).lower()
            buf = ""
            continue
        if lang not in SHELL:
            continue
        text = line.rstrip()
        if not buf:
            start = n
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        cmd = (buf + text).strip()
        buf = ""
        if cmd and not cmd.startswith("#"):
            out.append((start, cmd))
    return out


INLINE = re.compile(r"`((?:phoclip-[a-z]+|python3? (?:launch|sharding)/[\w/]+\.py|torchrun|deepspeed|make) [^`]*)`")


def inline_commands(md: Path) -> list[tuple[int, str]]:
    """(line number, command) of commands quoted inline in the prose (`phoclip-eval --model ...`)."""
    out, fenced = [], False
    for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s*```", line):
            fenced = not fenced
            continue
        if not fenced:
            out += [(n, m.group(1)) for m in INLINE.finditer(line)]
    return out


SHELL_VAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")


def segments(cmd: str) -> list[list[str]]:
    """The simple commands of a line (split at && || | ;), as words; comments dropped."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=";&|")
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        words = list(lex)
    except ValueError:  # $'...' quoting and the like: not one of ours to check
        return []
    segs, cur = [], []
    for w in words:
        if w in ("&&", "||", "|", ";", "&"):
            segs.append(cur)
            cur = []
        else:
            cur.append(w)
    segs.append(cur)
    return [s for s in segs if s]


def _deepspeed_flags() -> set[str]:
    """The DeepSpeed launcher's flags, read from its source (importing deepspeed takes
    tens of seconds)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return set()
    src = (Path(list(spec.submodule_search_locations)[0]) / "launcher" / "runner.py").read_text()
    return {f for call in re.findall(r"add_argument\(([^)]*)", src) for f in re.findall(r"[\"'](-{1,2}[\w-]+)[\"']", call)}


_DS_VALUELESS = {"--no_python", "--module", "--no_local_rank", "--autotuning", "--enable_each_rank_log",
                 "--bind_cores_to_rank", "--no_ssh_check", "--force_multi", "--save_pid", "--elastic_training",
                 "--no_ssh", "--use_hostfile"}


class Checker:
    """Checks the commands of one file; `errors` collects `file:line: what`."""

    def __init__(self, md: Path):
        self.md, self.errors, self.checked = md, [], 0
        self.loose = False  # inline mentions name a flag or two, not a whole command: flags only
        self.scripts = installed_commands()

    def error(self, line: int, msg: str) -> None:
        self.errors.append(f"{self.md.relative_to(ROOT)}:{line}: {msg}")

    def check_line(self, line: int, cmd: str) -> None:
        for words in segments(cmd):
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before a command
                words = words[1:]
            if words:
                self.check_words(line, words)

    def check_words(self, line: int, words: list[str]) -> None:
        head, args = words[0], words[1:]
        name = Path(head).name
        if name in self.scripts:
            return self.check_entry(line, name, self.scripts[name], args)
        if name in ("python", "python3") or head.endswith("/python"):
            if args and args[0].endswith(".py"):
                return self.check_script(line, args[0], args[1:])
            if args[:2] == ["-m", "pytest"]:
                self.checked += 1
                for a in args[2:]:
                    if a.startswith("tests/") and not (ROOT / a.split("::")[0]).exists():
                        self.error(line, f"{a}: no such test file")
            return
        if name == "torchrun":
            return self.check_torchrun(line, args)
        if name == "deepspeed":
            return self.check_deepspeed(line, args)
        if name == "make":
            return self.check_make(line, args)
        if name == "sbatch":
            return self.check_sbatch(line, args)

    def check_script(self, line: int, script: str, args: list[str]) -> None:
        if not (ROOT / script).is_file():
            return self.error(line, f"{script}: no such script")
        target = SCRIPT_TARGETS.get(script, script)
        self.check_entry(line, script, target, args)

    def check_torchrun(self, line: int, args: list[str]) -> None:
        from torch.distributed.run import get_args_parser

        if self.loose:  # a mention such as `torchrun --max-restarts`: its flags exist
            options = {o for a in get_args_parser()._actions for o in a.option_strings}
            for a in args:
                if a.startswith("-") and a.split("=", 1)[0] not in options:
                    self.error(line, f"torchrun: no option {a}")
                elif not a.startswith("-"):
                    break
            return
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                ns = get_args_parser().parse_args(args)
        except SystemExit:
            return self.error(line, f"torchrun refuses its options: {err.getvalue().strip().splitlines()[-1:]}")
        if ns.no_python:
            self.check_words(line, [ns.training_script, *ns.training_script_args])
        elif ns.module:
            self.error(line, f"torchrun -m {ns.training_script}: not a command the docs should use")
        else:
            self.check_script(line, ns.training_script, ns.training_script_args)

    def check_deepspeed(self, line: int, args: list[str]) -> None:
        known = _deepspeed_flags()
        i, no_python = 0, False
        while i < len(args) and args[i].startswith("-"):
            flag = args[i].split("=", 1)[0]
            if known and flag not in known:
                self.error(line, f"deepspeed: no option {flag}")
            no_python |= flag == "--no_python"
            if flag in ("--hostfile",) and not (ROOT / args[i + 1]).is_file() and args[i + 1].startswith("launch/"):
                self.error(line, f"deepspeed --hostfile {args[i + 1]}: no such file")
            i += 1 if ("=" in args[i] or flag in _DS_VALUELESS) else 2
        rest = args[i:]
        if not rest:
            return self.error(line, "deepspeed: no script")
        if no_python:
            self.check_words(line, rest)
        else:
            self.check_script(line, rest[0], rest[1:])

    def check_make(self, line: int, args: list[str]) -> None:
        targets = set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), re.M))
        self.checked += 1
        for t in (a for a in args if not a.startswith("-") and "=" not in a):
            if t not in targets:
                self.error(line, f"make {t}: no such target in the Makefile")

    def check_sbatch(self, line: int, args: list[str]) -> None:
        self.checked += 1
        i = 0
        while i < len(args) and args[i].startswith("-"):
            if args[i] == "--wrap" and i + 1 < len(args):
                self.check_line(line, args[i + 1])
                i += 2
                continue
            i += 1 if ("=" in args[i] or args[i] in ("--parsable",)) else 2
        if i < len(args):
            script = args[i]
            if not (ROOT / script).is_file():
                return self.error(line, f"sbatch {script}: no such script")
            overrides = [a for a in args[i + 1:] if "=" in a and not a.startswith("-")]
            if "train" in Path(script).name:
                self.check_overrides(line, None, overrides)
                self.check_names_its_shards(line, overrides)

    def check_entry(self, line: int, shown: str, target: str, args: list[str]) -> None:
        self.checked += 1
        parser = entry_parser(target)
        options = {s for a in parser._actions for s in a.option_strings}
        placeholder = "..." in args or "…" in args or self.loose
        # a shell variable ($SLURM_ARRAY_TASK_ID, ${OUT}) stands for a value: parse it as one that fits any type
        args = [SHELL_VAR.sub("1", a) for a in args]
        unknown = [a.split("=", 1)[0] for a in args if a.startswith("--") and a.split("=", 1)[0] not in options]
        for flag in unknown:
            self.error(line, f"{shown}: no option {flag}")
        if not placeholder and not unknown:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    if target == TRAIN_TARGET:
                        parser.parse_intermixed_args(args)
                    else:
                        parser.parse_args(args)
            except SystemExit as e:
                if e.code:
                    self.error(line, f"{shown}: refused by its parser: {err.getvalue().strip().splitlines()[-1:]}")
                return
        if target == TRAIN_TARGET and not {"-h", "--help"} & set(args):
            ns = _loose_parse(parser, args)
            self.check_overrides(line, ns.config, [a for a in ns.overrides if "=" in a],
                                 ns.deepspeed_config)
            if not ns.print_config and not placeholder:
                self.check_names_its_shards(line, ns.overrides)

    def check_names_its_shards(self, line: int, overrides: list[str]) -> None:
        """A training command trains on shards it names: the configs' data.train_shards
        are placeholders that no user's data matches."""
        if not any(o.startswith("data.train_shards=") for o in overrides):
            self.error(line, "a training command without data.train_shards=")

    def check_overrides(self, line: int, config: str | None, overrides: list[str], ds_json: str | None = None) -> None:
        """key=value overrides (and the repository's config files they go with) resolve."""
        from phoclip_train.config import ConfigError, resolve_config

        for f in (config, ds_json):
            if f and f.startswith("launch/") and not (ROOT / f).is_file():
                self.error(line, f"{f}: no such file")
        repo_config = str(ROOT / config) if config and config.startswith("launch/") and (ROOT / config).is_file() else None
        try:
            resolve_config(repo_config, overrides)
        except ConfigError as e:
            self.error(line, f"config: {e}")


def _loose_parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    ns, _ = parser.parse_known_intermixed_args([a for a in args if a not in ("...", "…")])
    return ns


def test_the_docs_hold_commands_to_check():
    """The reader finds the commands (a parsing slip must not make the check vacuous)."""
    n = 0
    for md in DOCS:
        c = Checker(md)
        for line, cmd in shell_lines(md):
            c.check_line(line, cmd)
        n += c.checked
    assert n >= 20, n


def test_the_checker_catches_a_drifted_command(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("```bash\nphoclip-eval --model m --shards s \\\n  --no-such-flag 1\n"
                  "torchrun --nproc_per_node 2 launch/train_ddp.py --config launch/configs/tiny-debug.yaml train.max_stepz=3\n"
                  "python launch/nope.py --x\nmake no-such-target\n"
                  "phoclip-train --config launch/configs/tiny-debug.yaml ... train.max_steps=20\n```\n"
                  "Inline: `phoclip-shards --merge` is fine, `phoclip-search --no-such` is not.\n")
    c = Checker(md)
    c.md = ROOT / "x.md"  # shown relative to the repository
    for line, cmd in shell_lines(md):
        c.check_line(line, cmd)
    c.loose = True
    for line, cmd in inline_commands(md):
        c.check_line(line, cmd)
    text = "\n".join(c.errors)
    assert "x.md:2: phoclip-eval: no option --no-such-flag" in text, text
    assert "x.md:4:" in text and "train.max_stepz" in text, text
    assert "launch/nope.py: no such script" in text and "make no-such-target" in text, text
    assert "x.md:9: phoclip-search: no option --no-such" in text, text
    assert "x.md:4: a training command without data.train_shards=" in text, text
    assert len(c.errors) == 6, text  # the placeholder line and the inline flag mention are fine


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_runs_as_written(md):
    c = Checker(md)
    for line, cmd in shell_lines(md):
        c.check_line(line, cmd)
    c.loose = True
    for line, cmd in inline_commands(md):
        c.check_line(line, cmd)
    assert not c.errors, "\n".join(c.errors)


# ----------------------------------------------------------------------------- run top to bottom

OUT_FLAGS = {"--out", "--output", "--html", "--map", "--tensorboard"}
# sections not held to this check (none now); {page: heading prefix}
PENDING: dict[str, str] = {}
SAME_SAID = re.compile(r"\b(again|the same (run|folder|index|output))\b", re.I)


class OutputChecker(Checker):
    """Where each command of a page writes (--out, --output, --html, --map, --tensorboard,
    run_dir=, the evaluation's default MODEL/eval-SOURCE.json, an export's folder), so
    that a page run top to bottom never has a later command replace or refuse an earlier
    one's output, unless the text beside it says so ("again", "the same run")."""

    def __init__(self, md: Path):
        super().__init__(md)
        self.page = md
        self.written: dict[str, int] = {}
        self.said = ""  # the comment beside or above the command being read

    def check_line(self, line: int, cmd: str) -> None:
        env = dict(w.split("=", 1) for w in cmd.split() if re.match(r"^[A-Z_]+=\S", w))
        if "sbatch" in cmd and "RUN_DIR" in env:
            self.wrote(line, env["RUN_DIR"])
        super().check_line(line, cmd)

    def check_entry(self, line: int, shown: str, target: str, args: list[str]) -> None:
        if "..." in args or "…" in args or {"-h", "--help", "--print-config"} & set(args):
            return
        self.checked += 1
        words = [a for a in args if a != "--resume"]
        outs = [words[i + 1] for i, a in enumerate(words[:-1]) if a in OUT_FLAGS]
        outs += [a.split("=", 1)[1] for a in words if "=" in a and a.split("=", 1)[0] in OUT_FLAGS]
        if {"--add", "--merge", "--part"} & set(args):  # parts of one index or shard folder: its purpose
            outs = []
        if "train" in target:
            outs += [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
        elif "evaluate" in target and not outs:
            from phoclip.evaluation.benchmarks import source_slug

            opt = lambda f, d=None: next((args[i + 1] for i, a in enumerate(args[:-1]) if a == f), d)
            if opt("--model"):
                slug = source_slug(opt("--benchmark"), opt("--shards"), opt("--split", "val"))
                outs.append(f"{opt('--model')}/eval-{slug}.json")
        elif "export" in target:
            pos = [a for a in args if not a.startswith("-")]
            outs += pos[1:2]
        for o in outs:
            self.wrote(line, o)

    def wrote(self, line: int, path: str) -> None:
        key = os.path.normpath(path.rstrip("/"))
        if key in self.written and not SAME_SAID.search(self.said):
            self.error(line, f"writes {path}, which line {self.written[key]} of the page already wrote")
        self.written.setdefault(key, line)

    def check_page(self) -> None:
        """Every fenced shell block of the page, in order, with the comment beside or above each command."""
        text = self.page.read_text(encoding="utf-8").splitlines()
        pending = PENDING.get(str(self.md.relative_to(ROOT)).replace(os.sep, "/"))
        for line, cmd in shell_lines(self.page):
            heading = next((t for t in reversed(text[:line]) if t.startswith("#") and t.lstrip("#").startswith(" ")
                            and not t.startswith("# ")), "")
            if pending and heading.startswith(pending):
                continue
            above, n = [], line - 2
            while n >= 0 and text[n].strip().startswith("#"):
                above.append(text[n])
                n -= 1
            self.said = " ".join(above) + " " + (cmd.split(" #", 1)[1] if " #" in cmd else "")
            self.check_line(line, cmd)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_two_commands_of_a_page_write_the_same_output(md):
    c = OutputChecker(md)
    c.check_page()
    assert not c.errors, "\n".join(c.errors)


def test_the_output_checker_catches_a_page_that_overwrites_itself(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("```bash\n"
                  "phoclip-index --model m --shards s --out index/ --map index/map.png\n"
                  "phoclip-index --model m --images p --out index\n"
                  "phoclip-eval --model runs/a --shards shards/vi\n"
                  "torchrun --nproc_per_node 2 launch/evaluate.py --model runs/a --shards shards/vi\n"
                  "phoclip-eval --model runs/a --shards 'a/val-{000000..000001}.tar'\n"
                  "phoclip-eval --model runs/a --shards 'b/val-{000000..000001}.tar'\n"
                  "phoclip-train --config launch/configs/tiny-debug.yaml data.train_shards=s run_dir=runs/t\n"
                  "# the same run, resumed on 4 processes\n"
                  "phoclip-train --config launch/configs/tiny-debug.yaml data.train_shards=s run_dir=runs/t --resume latest\n"
                  "phoclip-index --model m --images more --out index --add\n"
                  "```\n")
    c = OutputChecker(md)
    c.md = ROOT / "x.md"
    c.check_page()
    text = "\n".join(c.errors)
    assert "x.md:3: writes index, which line 2" in text, text
    assert "x.md:5: writes runs/a/eval-vi-val.json, which line 4" in text, text
    assert "x.md:7: writes runs/a/eval-val.json, which line 6" in text, text
    assert len(c.errors) == 3, text  # the resumed run says so; --add writes into an index on purpose
