"""The documentation's commands, run as written, so a documented command cannot rot.

Every shell command in a fenced block of README.md, the docs/ pages and cluster/README.md is either run
here or matched by a rule of NOT_HERE that says why it cannot run on a CPU machine without cloud
credentials; a new command that is neither fails `test_every_documented_command_is_accounted_for`.
Every relative link among them names a file (and a heading) that exists.

The runnable ones run in a copy of the checkout (so nothing lands in the developer's tree), in
README order, with only these adaptations, each a limit, not a change of meaning:
- `--max-steps 2` on fine-tunes, `--max-steps 2 --limit 4` on the quickstart, `--limit 4` on evaluate;
- `/tmp/fdllm` (the README's example output root) is a fresh temporary directory;
- the install half of `pip install ... && python ...` is skipped (CI's own install did it);
- Ray's session files go to a temporary RAY_TMPDIR; blocking servers are stopped after the curl.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import RAY_TRAIN_TEST_ENV

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

REPO = Path(__file__).resolve().parents[2]
# README.md and the pages it links under docs/ are one user guide; cluster/README.md is the cloud guide.
GUIDE = ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
DOCS = (*GUIDE, "cluster/README.md")

# What cannot run here, per document, by pattern, and why (matched against each documented command).
GUIDE_NOT_HERE = [
    (r"&& python -m pytest", "the test suite itself (`.ci/run` runs it)"),
    (r"benchmark", "benchmarks take minutes; their smoke tests are in tests/benchmarks and tests/kernels"),
    (r"mutmut run", "mutation testing takes hours on 2 cores: run by hand (tests/MUTATION.md), not in CI"),
    (r"evaluate\.py .*--quantization", "the evaluate command above plus one flag; tests/unit/test_quantization.py "
                                        "runs evaluate with --quantization"),
    (r"^python pipelines/distill\.py", "needs the fine-tune's output and decodes 20,000 prompts before training; "
     "tests/integration/test_distill.py runs distill end to end on a tiny model"),
    (r"evaluate\.py .*--policies", "needs the distilled model; tests/unit/test_evaluate_policies.py runs evaluate "
                                   "with --policies"),
    (r"lm-eval run ", "downloads its task's dataset; tests/integration/test_serve.py runs both lm-eval clients "
                      "against the server on a local task"),
]
NOT_HERE: dict[str, list[tuple[str, str]]] = {
    **dict.fromkeys(GUIDE, GUIDE_NOT_HERE),
    "cluster/README.md": [
        (r"^(aws|gcloud|kubectl|helm|docker) ", "needs cloud credentials or a Kubernetes cluster"),
        (r"^hf download ", "downloads a model or dataset from the Hugging Face Hub (no network at test time)"),
        (r"kubectl apply", "needs a Kubernetes cluster"),
        (r"^ray (up|down|dashboard|exec|attach) ", "starts or drives cloud machines"),
        (r"^ray get-auth-token", "writes the user's cluster token (cloud setup)"),
        (r"YOUR_BUCKET|\$CKPT|\$REGISTRY", "names the user's bucket, checkpoint or registry"),
        (r"--address http://127\.0\.0\.1:8265", "talks to the cloud head through the forwarded dashboard"),
        (r"127\.0\.0\.1:8000", "calls the cloud head's Serve proxy through `ray attach -p 8000`"),
        (r"^(export |ACCOUNT=|CKPT=|CONF=)", "shell setup for the cloud commands that follow it"),
        (r"^pip install \"ray\[default", "the laptop client of a cloud cluster"),
    ],
}


def documented_commands(doc: str) -> list[str]:
    """The shell commands of a markdown file's bash/sh blocks: continuations joined, comments and
    blank lines dropped, a heredoc kept with the command that opens it."""
    text = (REPO / doc).read_text()
    commands: list[str] = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M):
        lines = iter(_quoted_lines_joined(block.replace("\\\n", " ").splitlines()))
        for line in lines:
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:
                body = []
                for more in lines:
                    body.append(more)
                    if more.strip() == heredoc.group(1):
                        break
                line = "\n".join([line, *body])
            command = re.sub(r"\s+#.*$", "", line) if not heredoc else line
            command = re.sub(r"\s+", " ", command).strip() if not heredoc else command.strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def _quoted_lines_joined(lines: list[str]) -> list[str]:
    """A quoted argument may span lines (the README's curl -d '{...}'): join until quotes close."""
    joined: list[str] = []
    pending = ""
    for line in lines:
        pending = f"{pending} {line.strip()}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        joined.append(pending)
        pending = ""
    return joined + ([pending] if pending else [])


def python_snippets(doc: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / doc).read_text(), flags=re.S | re.M)


def split_install(command: str) -> str:
    """`pip install A && pip install B && python X` -> `python X` (CI's install already ran)."""
    return " && ".join(part for part in command.split(" && ") if not part.startswith("pip install"))


# The commands the chain below runs, exactly as documented (before the adaptations above).
README = documented_commands("README.md")
QUICKSTART = next(c for c in README if c.endswith("python pipelines/quickstart.py"))
FINETUNE = next(c for c in README if c.startswith("python pipelines/finetune.py"))
RAY_START = next(c for c in README if c.startswith("ray start"))
JOB_SUBMIT = next(c for c in README if c.startswith("RAY_AUTH_MODE=token ray job submit"))
RAY_STOP = next(c for c in README if c == "ray stop")
FDLLM_SERVE = next(c for c in README if c.startswith("fdllm-serve"))
SERVE_RUN = "serve run serve/config.yaml"  # the README's alternative to fdllm-serve (in its comment)
# cluster/README.md's local try of the cluster's commands: the README's fine-tune, then Serve on its output
CLUSTER_SERVE = next(c for c in documented_commands("cluster/README.md") if c.startswith("serve run serve.app:build_app"))
CURL = next(c for c in README if c.startswith("curl "))
EVALUATES = [c for c in README if c.startswith("python pipelines/evaluate.py --model runs/quickstart/")]
RUN_HERE = {QUICKSTART, FINETUNE, RAY_START, JOB_SUBMIT, RAY_STOP, FDLLM_SERVE, SERVE_RUN, CLUSTER_SERVE, CURL, *EVALUATES}


def test_every_documented_command_is_accounted_for():
    assert "# or: serve run serve/config.yaml" in (REPO / "README.md").read_text()
    unknown = []
    for doc in DOCS:
        for command in documented_commands(doc):
            if command not in RUN_HERE and not any(re.search(p, command) for p, _ in NOT_HERE[doc]):
                unknown.append(f"{doc}: {command}")
    assert not unknown, ("documented commands neither run by tests/integration/test_docs.py nor listed in "
                         "its NOT_HERE with a reason:\n" + "\n".join(unknown))


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    """A page moved or a heading renamed must not leave a link that 404s on GitHub."""
    broken = []
    for doc in DOCS:
        page = REPO / doc
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{doc}: {target} (no {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked})")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                if anchor not in {heading_anchor(h) for h in headings}:
                    broken.append(f"{doc}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_documented_commands_parse():
    """Cheap: the extraction finds the README's commands (a broken fence would hide them all)."""
    assert len(README) >= 8 and all("\n" not in c or "<<" in c for c in README)
    assert "--working-dir . -- python pipelines/finetune.py" in JOB_SUBMIT
    assert len(EVALUATES) == 3 and any("speculative" in c for c in EVALUATES)


class Shell:
    """Runs documented commands in a copy of the checkout, with the adaptations of the module doc."""

    def __init__(self, root: Path, out: Path, ray_tmp: Path) -> None:
        self.root, self.out = root, out
        self.env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TOKENIZERS_PARALLELISM": "false",
                    "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
        for key in ("RAY_ADDRESS", *RAY_TRAIN_TEST_ENV):  # a user's Ray: no cluster joined, Ray Train's defaults
            self.env.pop(key, None)

    def adapt(self, command: str, extra: str = "") -> str:
        return split_install(command).replace("/tmp/fdllm", str(self.out)) + extra

    def run(self, command: str, extra: str = "", timeout: float = 600) -> str:
        command = self.adapt(command, extra)
        proc = subprocess.run(command, shell=True, cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{log[-6000:]}"
        return log

    def start(self, command: str) -> subprocess.Popen:
        return subprocess.Popen(self.adapt(command), shell=True, cwd=self.root, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(server: subprocess.Popen, url: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited {server.returncode}:\n{server.stdout.read()[-6000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} not healthy after {timeout_s:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it; then make sure nothing is left. A server that already exited with
    its whole process group is stopped: its failure, not this, is what the test reports."""
    try:
        os.killpg(server.pid, signal.SIGINT)
    except ProcessLookupError:
        server.wait()
        return
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def copy_checkout(dest: Path) -> Path:
    """The files a fresh clone would have, with this working tree's edits (tracked and new files)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def submit_when_the_job_agent_is_up(shell: Shell, timeout_s: float = 120) -> str:
    """`ray start` returns before the head's job agent serves; a submit that early is refused with
    "No available agent" (nothing runs), and the user resubmits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return shell.run(JOB_SUBMIT, " --max-steps 2")
        except AssertionError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(3)


# An error-level line of Ray's own logs ("[2026-12-04 03:04:53,888 E 20628 20660] core_worker.cc:...").
RAY_ERROR_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\].*")


def assert_no_ray_errors(output: str) -> None:
    """A run that went well prints no error of Ray's (a local fine-tune printed one for Ray Train's
    preemption watcher, an actor no local run needs)."""
    errors = RAY_ERROR_LINE.findall(output)
    assert not errors, "\n".join(errors)


def served_answer(shell: Shell) -> str:
    answer = shell.run(CURL)
    body = answer[answer.index("{"):]
    assert '"chat.completion"' in body and '"content"' in body, body
    return body


@pytest.mark.skipif(not shutil.which("curl"), reason="the README's request uses curl")
def test_readme_commands_run_as_written(tmp_path):
    root = copy_checkout(tmp_path / "clone")
    ray_tmp = Path(tempfile.mkdtemp(prefix="fdr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    shell = Shell(root, tmp_path / "out", ray_tmp)
    try:
        # The main job (step-limited): writes runs/quickstart/tiny-dllm, which the later commands use.
        output = shell.run(QUICKSTART, " --max-steps 2 --limit 4")
        # The fine-tune's progress bar is gone once training returned: a stale one (Ray Train delivers
        # a worker bar's closing state twice) was redrawn under every line of the report.
        after_training = output.split("2/2 evaluating")[-1]
        assert "fine-tune steps" not in after_training, after_training[:3000]
        assert_no_ray_errors(output)
        checkpoint = root / "runs" / "quickstart" / "tiny-dllm"
        assert (checkpoint / "config.json").is_file() and (checkpoint / "fdllm_config.json").is_file()

        # Fine-tune, run directly: relative config/model/data paths reach the Ray Train workers.
        assert_no_ray_errors(shell.run(FINETUNE, " --max-steps 2"))
        assert (tmp_path / "out" / "tiny-dllm" / "model.safetensors").is_file()
        shutil.rmtree(tmp_path / "out" / "tiny-dllm")

        # The same entry point submitted as a Ray job to a `ray start` cluster.
        shell.run(RAY_START)
        try:
            log = submit_when_the_job_agent_is_up(shell)
            assert "succeeded" in log, log[-3000:]
        finally:
            shell.run(RAY_STOP)
        assert (tmp_path / "out" / "tiny-dllm" / "model.safetensors").is_file()

        # Serve the quickstart's checkpoint both documented ways, and the fine-tune's as cluster/README.md
        # does, and send the README's request to each.
        for command in (FDLLM_SERVE, SERVE_RUN, CLUSTER_SERVE):
            server = shell.start(command)
            try:
                wait_healthy(server, "http://127.0.0.1:8000")
                served_answer(shell)
            finally:
                stop(server)

        for evaluate in EVALUATES:  # on the quickstart's (joint) checkpoint: every mode, larger sub-blocks
            shell.run(evaluate, " --limit 4")
        for snippet in python_snippets("README.md"):  # "Use it from Python", on the quickstart's checkpoint
            shell.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(snippet)}", timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
