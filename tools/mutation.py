#!/usr/bin/env python3
"""
Mutation testing of the checks that decide what mailrelay accepts:
`make mutation-test` (docs/operations.md, *Mutation testing*).

Each mutant is the code with one small change (a comparison turned, a
condition made always true or always false, a call or a raise removed, a
constant moved by one...).  A test must fail for each: a mutant the tests
let through (a survivor) is a check whose removal no test would notice.

What is mutated and which tests run for it is in tools/mutation.toml: per
module, the functions in scope (by qualified name: the line ranges are
computed from the source each run, so they follow the code) and the trial
test modules that guard them.  Mutants inside annotations, f-strings (the
text of a message) and logging calls are left out: none decides what is
accepted.

The run never touches the working tree: it copies mailrelay/, tests/ and
twisted/ under --work (build/mutation/) and mutates the copy, so others
editing or testing the tree meanwhile see nothing of it, and an
interrupted run leaves no mutant behind.

cosmic-ray makes and runs the mutants (its operators, its session
databases and its mutate-and-test step); this script chooses them,
adds the operators that matter most for checks (mailrelay/...), and
judges the result.  Each module's session is kept under
build/mutation/sessions/ for `cr-report --show-diff --surviving-only`.

Exit status 1 if a mutant survives that tests/mutation-survivors.toml does
not list as accepted (an equivalent mutant: no behaviour can tell it from
the code, with the reason why); 2 if the run itself cannot be made (the
tests fail unmutated, the copy is not what the tests import).

  --sample N --seed S   N mutants drawn, with seed S, from the modules
                        marked trust = true (what CI runs)
  --module M            only modules whose path in mailrelay/ contains M
                        (repeatable): "relay/", "client/contacts.py", "keys"
  --again               only the mutants that survived the last run (after
                        writing the tests that should kill them)
  --list                count and list the mutants in scope; run nothing
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: cosmic-ray depends on toml
    tomllib = None
    import toml

try:
    from parso.python.tree import Keyword, PythonNode
    from parso.python.tree import Operator as Operator_

    import cosmic_ray.commands
    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.operators.operator import Example, Operator
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult
except ImportError:
    print("tools/mutation.py needs cosmic-ray: run it through `make mutation-test`, "
          "or pip install -e '.[mutation]'", file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parent.parent


def die(message: str) -> None:
    """The run cannot be made: say why, exit 2 (1 is for survivors)."""
    print(message, file=sys.stderr)
    sys.exit(2)


COPIED = ("mailrelay", "tests", "twisted")
LOG_METHODS = {"debug", "info", "warn", "error", "failure", "critical"}


# The operators added to cosmic-ray's: what removing a check looks like.

def _keyword(value: str, like) -> Keyword:
    first = like.get_first_leaf()
    return Keyword(value, first.start_pos, prefix=first.prefix)


def _conditions(node):
    """The condition nodes of an if/elif, while, comprehension if or ternary."""
    if node.type in ("if_stmt", "while_stmt"):
        return [node.children[i + 1] for i, child in enumerate(node.children)
                if child.type == "keyword" and child.value in ("if", "elif", "while")]
    if node.type == "comp_if":
        return [node.children[1]]
    if node.type == "test" and len(node.children) == 5:
        return [node.children[2]]
    return []


class _ConditionOperator(Operator):
    value: str
    """What the condition becomes (a subclass says)."""

    def _targets(self, node):
        """The conditions of C{node} that are not C{value} already."""
        return [c for c in _conditions(node) if c.get_code().strip() != self.value]

    def mutation_positions(self, node):
        for condition in self._targets(node):
            yield condition.start_pos, condition.end_pos

    def mutate(self, node, index):
        condition = self._targets(node)[index]
        position = node.children.index(condition)
        node.children[position] = _keyword(self.value, condition)
        return node


class ConditionTrue(_ConditionOperator):
    """The condition always holds: a check that can no longer refuse."""

    value = "True"

    @classmethod
    def examples(cls):
        return (Example("if x > 1: pass", "if True: pass"),)


class ConditionFalse(_ConditionOperator):
    """The condition never holds: a check removed."""

    value = "False"

    @classmethod
    def examples(cls):
        return (Example("if x > 1: pass", "if False: pass"),)


def _is_log_call(node) -> bool:
    names = [c.children[1].value for c in node.children[1:]
             if c.type == "trailer" and c.children[0].value == "."]
    first = node.children[0]
    return (len(names) >= 1 and names[-1] in LOG_METHODS
            and ("log" in names[:-1] or "_log" in names[:-1]
                 or (first.type == "name" and first.value in ("log", "_log"))))


def _statement(node, kinds):
    """The one statement of a simple_stmt, when it is of one of C{kinds}."""
    if node.type == "simple_stmt" and len(node.children) == 2:
        statement = node.children[0]
        if statement.type in kinds:
            return statement
    return None


class _RemoveStatement(Operator):
    """A statement of a kind a subclass picks becomes C{pass}."""

    def _target(self, node):
        """The statement of C{node} to remove, or None."""
        raise NotImplementedError

    def mutation_positions(self, node):
        statement = self._target(node)
        if statement is not None:
            yield statement.start_pos, statement.end_pos

    def mutate(self, node, index):
        node.children[0] = _keyword("pass", self._target(node))
        return node


class RemoveCall(_RemoveStatement):
    """A call made for its effect (a write, a check, a setting) is not made."""

    def _target(self, node):
        statement = _statement(node, ("atom_expr", "power"))
        if (statement is not None and statement.children[0].type != "keyword"
                and statement.children[-1].type == "trailer"
                and statement.children[-1].children[0].value == "("
                and not _is_log_call(statement)):
            return statement
        return None

    @classmethod
    def examples(cls):
        return (Example("f(x)\n", "pass\n"),)


class RemoveRaise(_RemoveStatement):
    """A refusal (raise) that does not happen."""

    def _target(self, node):
        return _statement(node, ("raise_stmt",))

    @classmethod
    def examples(cls):
        return (Example("raise E('x')\n", "pass\n"),)


class SwapMembership(Operator):
    """C{in} becomes C{not in} and the other way round."""

    def _points(self, node):
        if node.type != "comparison":
            return []
        return [i for i, child in enumerate(node.children[1::2], start=0)
                if child.get_code().split() in (["in"], ["not", "in"])]

    def mutation_positions(self, node):
        for i in self._points(node):
            op = node.children[2 * i + 1]
            yield op.start_pos, op.end_pos

    def mutate(self, node, index):
        i = self._points(node)[index]
        op = node.children[2 * i + 1]
        first = op.get_first_leaf()
        if op.get_code().split() == ["not", "in"]:
            node.children[2 * i + 1] = Keyword("in", first.start_pos, prefix=first.prefix)
        else:
            node.children[2 * i + 1] = PythonNode("comp_op", [
                Keyword("not", first.start_pos, prefix=first.prefix),
                Keyword("in", first.start_pos, prefix=" ")])
        return node

    @classmethod
    def examples(cls):
        return (Example("x in y", "x not in y"), Example("x not in y", "x in y"))


class ExceptionNotCaught(Operator):
    """
    One exception type of an except clause is not caught any more (it
    becomes C{()}, which matches nothing): the refusal it turned into an
    answer escapes as it was raised.  (cosmic-ray's ExceptionReplacer
    fails on dotted names such as C{keys.BadKey}.)
    """

    def _types(self, node):
        if node.type != "except_clause":
            return []
        caught = node.children[1]
        if caught.type == "atom" and caught.children[0].value == "(":
            inner = caught.children[1]
            if inner.type == "testlist_comp":
                return [c for c in inner.children if c.type != "operator"]
            return [inner]
        return [caught]

    def mutation_positions(self, node):
        for caught in self._types(node):
            yield caught.start_pos, caught.end_pos

    def mutate(self, node, index):
        caught = self._types(node)[index]
        first = caught.get_first_leaf()
        empty = PythonNode("atom", [Operator_("(", first.start_pos, prefix=first.prefix),
                                    Operator_(")", first.start_pos)])
        parent = caught.parent
        parent.children[parent.children.index(caught)] = empty
        empty.parent = parent
        return node

    @classmethod
    def examples(cls):
        return (Example("try: f()\nexcept (a.B, C): pass", "try: f()\nexcept ((), C): pass"),)


SYNCHRONOUS = re.compile(r"(PRAGMA\s+synchronous\s*=\s*)(\w+)", re.IGNORECASE)


class SynchronousOff(Operator):
    """
    A SQLite file written with C{synchronous=OFF}: a commit is no longer
    on disk when it returns (the durability that acknowledging, showing
    and accepting wait for).
    """

    def mutation_positions(self, node):
        if node.type == "string":
            match = SYNCHRONOUS.search(node.value)
            if match and match.group(2).upper() != "OFF":
                yield node.start_pos, node.end_pos

    def mutate(self, node, index):
        node.value = SYNCHRONOUS.sub(r"\1OFF", node.value)
        return node

    @classmethod
    def examples(cls):
        return (Example('x("PRAGMA synchronous=FULL")', 'x("PRAGMA synchronous=OFF")'),)


class MailrelayOperators:
    """A cosmic-ray operator provider for the operators above."""

    operators = {cls.__name__: cls for cls in
                 (ConditionTrue, ConditionFalse, RemoveCall, RemoveRaise, SwapMembership,
                  ExceptionNotCaught, SynchronousOff)}

    def __iter__(self):
        return iter(self.operators)

    def __getitem__(self, name):
        return self.operators[name]


class _Selected:
    """A provider that lists only C{names} of C{provider} (and still gets any)."""

    def __init__(self, provider, names):
        self.provider, self.names = provider, names

    def __iter__(self):
        return iter(self.names)

    def __getitem__(self, name):
        return self.provider[name]


def install_operators(names: list[str]) -> None:
    """Make cosmic-ray's init use exactly the operators C{names}."""
    providers = cosmic_ray.plugins.OPERATOR_PROVIDERS
    providers.setdefault("mailrelay", MailrelayOperators())
    by_provider: dict[str, list[str]] = {}
    for name in names:
        provider, _, operator = name.partition("/")
        try:
            providers[provider][operator]
        except KeyError:
            die(f"tools/mutation.toml: no operator {name!r} (see `cosmic-ray operators`)")
        by_provider.setdefault(provider, []).append(operator)
    for provider in list(providers):
        providers[provider] = _Selected(getattr(providers[provider], "provider",
                                                providers[provider]),
                                        by_provider.get(provider, []))


# Where in a module mutants count.

@dataclass
class Scope:
    """The functions of one module, and the spans where a mutant decides nothing."""

    functions: dict[str, tuple[int, int]]
    selected: list[tuple[int, int]]
    ignored: list[tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=list)

    def function_at(self, line: int) -> str:
        best = ""
        for name, (start, end) in self.functions.items():
            if start <= line <= end and (not best or start >= self.functions[best][0]):
                best = name
        return best or "<module>"

    def wanted(self, start: tuple[int, int], end: tuple[int, int]) -> bool:
        if not any(a <= start[0] <= b for a, b in self.selected):
            return False
        return not any(s <= start and end <= e for s, e in self.ignored)


def _char_col(lines: list[str], line: int, byte_col: int) -> int:
    text = lines[line - 1].encode("utf-8")
    return len(text[:byte_col].decode("utf-8", "replace"))


def scope_of(path: Path, wanted: list[str] | None) -> Scope:
    """
    The line ranges of the functions C{wanted} (qualified names, as
    C{Class.method}), or of the whole module when None; and the spans of
    annotations, f-strings and logging calls, which are left out.
    """
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    functions: dict[str, tuple[int, int]] = {}

    def collect(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                functions[name] = (start, child.end_lineno)
                collect(child, name + ".")
            else:
                collect(child, prefix)

    collect(tree, "")
    if wanted is None:
        selected = [(1, len(lines) + 1)]
    else:
        missing = [name for name in wanted if name not in functions]
        if missing:
            die(f"tools/mutation.toml: {path.relative_to(ROOT)} has no "
                     f"{', '.join(missing)} (renamed? update the scope)")
        selected = [functions[name] for name in wanted]

    ignored = []

    def span(node):
        return ((node.lineno, _char_col(lines, node.lineno, node.col_offset)),
                (node.end_lineno, _char_col(lines, node.end_lineno, node.end_col_offset)))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    ignored.append(span(arg.annotation))
            if node.returns is not None:
                ignored.append(span(node.returns))
        elif isinstance(node, ast.AnnAssign):
            ignored.append(span(node.annotation))
        elif isinstance(node, ast.JoinedStr):
            ignored.append(span(node))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in LOG_METHODS and "log" in ast.unparse(node.func.value)):
            ignored.append(span(node))
    return Scope(functions, selected, ignored)


# The run.

@dataclass
class Module:
    path: str
    tests: list[str]
    functions: list[str] | None
    trust: bool

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.path.removesuffix(".py")).strip("-")


@dataclass
class Survivor:
    module: str
    function: str
    line: str
    mutant: str
    operator: str
    lineno: int
    diff: str

    def key(self) -> tuple[str, str, str, str]:
        return self.module, self.function, self.line, self.mutant


def load_toml(path: Path) -> dict:
    if tomllib is not None:
        with path.open("rb") as f:
            return tomllib.load(f)
    return toml.load(str(path))


def load_config(path: Path) -> tuple[dict, list[Module]]:
    config = load_toml(path)
    modules = [Module(m["path"], list(m["tests"]), m.get("functions"), bool(m.get("trust")))
               for m in config["module"]]
    return config, modules


def load_accepted(path: Path) -> dict[tuple[str, str, str, str], dict]:
    if not path.exists():
        return {}
    accepted = {}
    for entry in load_toml(path).get("survivor", []):
        for name in ("module", "function", "line", "mutant", "operator", "reason"):
            if not str(entry.get(name, "")).strip():
                die(f"{path}: an entry without {name!r}: {entry}")
        accepted[(entry["module"], entry["function"], entry["line"].strip(),
                  entry["mutant"].strip())] = entry
    return accepted


def copy_tree(work: Path) -> Path:
    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_trial_temp*", "dropin.cache")
    for name in COPIED:
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    return tree


def test_command(module: Module) -> str:
    return shlex.join([sys.executable, "-m", "twisted.trial", "--exitfirst", *module.tests])


def run_plain(command: str, tree: Path, timeout: float | None = None):
    started = time.monotonic()
    done = subprocess.run(shlex.split(command), cwd=tree, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout)
    return done.returncode, done.stdout.decode("utf-8", "replace"), time.monotonic() - started


def skip(db_path: Path, job_ids: list[str], reason: str) -> None:
    """Mark C{job_ids} of a module's session as skipped, for C{reason}."""
    if job_ids:
        with use_db(str(db_path), WorkDB.Mode.open) as db:
            db.set_multiple_results(job_ids, WorkResult(
                output=reason, worker_outcome=WorkerOutcome.SKIPPED))


def check_copy(tree: Path) -> None:
    """The tests must import the copy, or every mutant would survive unseen."""
    code, output, _ = run_plain(shlex.join(
        [sys.executable, "-c", "import mailrelay, tests; print(mailrelay.__file__); "
                               "print(tests.__file__)"]), tree)
    paths = output.split()
    if code or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(tree.resolve())
                                          for p in paths):
        die(f"mutation: the tests do not import the copy in {tree}: {output.strip()}")


def changed_lines(diff: str) -> tuple[str, str]:
    removed, added = [], []
    for line in diff.splitlines():
        if line.startswith("---") or line.startswith("+++"):
            continue
        if line.startswith("-"):
            removed.append(line[1:].strip())
        elif line.startswith("+"):
            added.append(line[1:].strip())
    return " ".join(removed), " ".join(added)


def session_items(module: Module, tree: Path, sessions: Path):
    """Initialise the module's session; mark what is out of scope skipped."""
    path = tree / module.path
    scope = scope_of(path, module.functions)
    db_path = sessions / f"{module.slug}.sqlite"
    if db_path.exists():
        db_path.unlink()
    with use_db(str(db_path)) as db:
        cosmic_ray.commands.init([path], db, {})
        out = [item.job_id for item in db.work_items
               if not scope.wanted(item.mutations[0].start_pos, item.mutations[0].end_pos)]
        if out:
            db.set_multiple_results(out, WorkResult(output="out of scope",
                                                    worker_outcome=WorkerOutcome.SKIPPED))
        pending = sorted(db.pending_work_items,
                         key=lambda i: (i.mutations[0].start_pos, i.mutations[0].operator_name,
                                        i.mutations[0].occurrence))
    return db_path, scope, pending


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "tools" / "mutation.toml"))
    parser.add_argument("--survivors", default=str(ROOT / "tests" / "mutation-survivors.toml"))
    parser.add_argument("--work", default=str(ROOT / "build" / "mutation"))
    parser.add_argument("--module", action="append", default=[])
    parser.add_argument("--sample", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--again", action="store_true")
    args = parser.parse_args(argv)

    config, modules = load_config(Path(args.config))
    if args.module:
        # Matched against the path inside the package: "relay/" is the relay's
        # modules, not every path under mailrelay/.
        modules = [m for m in modules
                   if any(part in m.path.removeprefix("mailrelay/") for part in args.module)]
    if args.sample is not None:
        modules = [m for m in modules if m.trust]
    if not modules:
        die("mutation: no module selected")
    accepted = load_accepted(Path(args.survivors))
    install_operators(config["operators"])

    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    work = Path(args.work)
    tree = copy_tree(work)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tree.resolve())] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    sessions = work / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)

    plan = []
    for module in modules:
        db_path, scope, pending = session_items(module, tree, sessions)
        plan.append((module, db_path, scope, pending))

    if args.again:
        # Only the mutants that survived the last run (work/summary.json):
        # matched by module, function, operator and source line, so they are
        # found again after edits moved them.
        try:
            last = json.loads((work / "summary.json").read_text())["survivors"]
        except (OSError, ValueError, KeyError):
            die(f"mutation: --again needs the summary of a run in {work}")
        for i, (module, db_path, scope, pending) in enumerate(plan):
            source = (tree / module.path).read_text(encoding="utf-8").splitlines()

            def again(item, module=module, scope=scope, source=source):
                m = item.mutations[0]
                text = source[m.start_pos[0] - 1].strip()
                return any(s["module"] == module.path and s["operator"] == m.operator_name
                           and s["function"] == scope.function_at(m.start_pos[0])
                           and s["line"].startswith(text) for s in last)

            keep, dropped = [], []
            for item in pending:
                (keep if again(item) else dropped).append(item)
            skip(db_path, [item.job_id for item in dropped], "survived no earlier run")
            plan[i] = (module, db_path, scope, keep)

    if args.sample is not None:
        everything = [(i, item) for i, (_, _, _, pending) in enumerate(plan) for item in pending]
        chosen = set(random.Random(args.seed).sample(range(len(everything)),
                                                     min(args.sample, len(everything))))
        dropped: dict[int, list[str]] = {}
        for n, (i, item) in enumerate(everything):
            if n not in chosen:
                dropped.setdefault(i, []).append(item.job_id)
        for i, (module, db_path, scope, pending) in enumerate(plan):
            dropped_ids = set(dropped.get(i, ()))
            skip(db_path, list(dropped_ids), "not in the sample")
            plan[i] = (module, db_path, scope,
                       [p for p in pending if p.job_id not in dropped_ids])

    total = sum(len(p) for _, _, _, p in plan)
    what = (f"a sample of {total} (seed {args.seed}) of the trust modules' mutants"
            if args.sample is not None else f"{total} mutants")
    print(f"mutation: {what} in {len(plan)} modules; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores", flush=True)
    if args.list:
        for module, _, scope, pending in plan:
            print(f"{module.path}: {len(pending)}")
            for item in pending:
                m = item.mutations[0]
                print(f"  {m.start_pos[0]:5} {scope.function_at(m.start_pos[0])} {m.operator_name}")
        return 0

    check_copy(tree)
    os.chdir(tree)
    rows, survivors, broken, matched = [], [], [], set()
    started_all = time.monotonic()
    done = 0
    for module, db_path, scope, pending in plan:
        if not pending:
            continue
        command = test_command(module)
        code, output, baseline = run_plain(command, tree)
        if code:
            print(output[-3000:])
            die(f"mutation: {module.path}: its tests fail without any mutation "
                     f"({command})")
        timeout = max(float(config.get("timeout-min", 30)),
                      float(config.get("timeout-factor", 4)) * baseline)
        print(f"== {module.path}: {len(pending)} mutants; tests {' '.join(module.tests)} "
              f"take {baseline:.1f} s unmutated (timeout {timeout:.0f} s)", flush=True)
        source = (tree / module.path).read_text(encoding="utf-8").splitlines()
        counts = {"killed": 0, "survived": 0, "timeout": 0, "accepted": 0}
        started = time.monotonic()
        with use_db(str(db_path), WorkDB.Mode.open) as db:
            for item in pending:
                m = item.mutations[0]
                t0 = time.monotonic()
                result = mutate_and_test(item.mutations, command, timeout)
                db.set_result(item.job_id, result)
                took = time.monotonic() - t0
                done += 1
                where = f"{module.path}:{m.start_pos[0]} {m.operator_name}"
                if result.worker_outcome not in (WorkerOutcome.NORMAL, WorkerOutcome.NO_TEST):
                    broken.append(f"{where}: {result.worker_outcome}\n{result.output}")
                    verdict = "ERROR"
                elif result.worker_outcome == WorkerOutcome.NO_TEST:
                    verdict = "not applicable"
                elif result.test_outcome == TestOutcome.SURVIVED:
                    line, mutant = changed_lines(result.diff)
                    survivor = Survivor(module.path, scope.function_at(m.start_pos[0]),
                                        line or source[m.start_pos[0] - 1].strip(), mutant,
                                        m.operator_name, m.start_pos[0], result.diff)
                    if survivor.key() in accepted:
                        matched.add(survivor.key())
                        counts["accepted"] += 1
                        verdict = "survived (accepted: equivalent)"
                    else:
                        survivors.append(survivor)
                        verdict = "SURVIVED"
                    counts["survived"] += 1
                else:
                    counts["killed"] += 1
                    if result.output == "timeout":
                        counts["timeout"] += 1
                    verdict = "killed" + (" (timeout)" if result.output == "timeout" else "")
                print(f"[{done}/{total}] {where} {verdict} {took:.1f} s", flush=True)
        elapsed = time.monotonic() - started
        rows.append((module.path, counts, len(pending), elapsed))

    elapsed_all = time.monotonic() - started_all
    print()
    header = (f"{'module':38} {'mutants':>7} {'killed':>6} {'survived':>8} {'accepted':>8} "
              f"{'score':>6} {'time':>7} {'s/mutant':>8}")
    print(header)

    def row(name: str, counts: dict, n: int, seconds: float) -> float:
        """Print one line of the table; return its score."""
        judged = counts["killed"] + counts["survived"]
        score = 100.0 * counts["killed"] / judged if judged else 100.0
        print(f"{name:38} {n:7} {counts['killed']:6} {counts['survived']:8} "
              f"{counts['accepted']:8} {score:5.1f}% {seconds:6.0f}s {seconds / max(n, 1):8.1f}")
        return score

    totals = {k: sum(counts[k] for _, counts, _, _ in rows)
              for k in ("killed", "survived", "timeout", "accepted")}
    for path, counts, n, elapsed in rows:
        row(path, counts, n, elapsed)
    score = row("total", totals, total, elapsed_all)
    judged = totals["killed"] + totals["survived"]
    print(f"mutation score {score:.1f}% ({totals['killed']} of {judged} killed, "
          f"{totals['timeout']} by timeout; {totals['accepted']} survivors accepted as "
          f"equivalent), {elapsed_all:.0f} s, {elapsed_all / max(total, 1):.1f} s a mutant; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    (work / "summary.json").write_text(json.dumps({
        "sample": args.sample, "seed": args.seed if args.sample is not None else None,
        "seconds": round(elapsed_all, 1), "score": round(score, 2), "totals": totals,
        "modules": [{"path": p, "mutants": n, "seconds": round(e, 1), **c}
                    for p, c, n, e in rows],
        "survivors": [s.__dict__ for s in survivors],
    }, indent=2) + "\n")

    status = 0
    if not (args.sample is not None or args.again or args.module):
        # A whole run meets every accepted survivor that still exists.
        stale = [key for key in accepted if key not in matched]
        if stale:
            print(f"\n{len(stale)} entries of {args.survivors} matched no survivor (the code "
                  f"changed, or a test now kills them): remove them")
            for module, function, line, mutant in stale:
                print(f"  {module} {function}: {line} -> {mutant}")
    if broken:
        print(f"\n{len(broken)} mutants could not be run:")
        for text in broken:
            print(text)
        status = 2
    if survivors:
        print(f"\n{len(survivors)} mutants survived that {args.survivors} does not accept. "
              f"Write a test that kills each, or, if no behaviour can tell it from the code "
              f"(an equivalent mutant), add it there with the reason:\n")
        for s in survivors:
            print(f"{s.module}:{s.lineno} in {s.function} ({s.operator})")
            print("\n".join("    " + line for line in s.diff.splitlines()
                            if line[:1] in "+-" and not line.startswith(("---", "+++"))))
            print(f"[[survivor]]\nmodule = {json.dumps(s.module)}\n"
                  f"function = {json.dumps(s.function)}\nline = {json.dumps(s.line)}\n"
                  f"mutant = {json.dumps(s.mutant)}\noperator = {json.dumps(s.operator)}\n"
                  f"reason = \"\"\n")
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
