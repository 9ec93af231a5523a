"""Issue 5.1: remote storage. The shipped default local remote, and a dvc-ssh remote on a real OpenSSH
server: push from one clone, pull into a fresh one (clean status, nothing re-runs), and a corrupted remote
object caught by `verify = true`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.conftest import DIR_OUTS

pytestmark = pytest.mark.slow

UP_TO_DATE = "Data and pipelines are up to date."


def remote_objects(store: Path) -> list[Path]:
    return sorted(p for p in (store / "files" / "md5").rglob("*") if p.is_file())


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def assert_nothing_reruns(project) -> None:
    assert project.dvc("status").stdout.strip() == UP_TO_DATE
    out = project.dvc("repro").stdout
    assert "Running stage" not in out, out
    for stage in ("base", "prepare", "tokenize", "pairs", "reference", "train", "merge", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in out


def test_default_local_remote_push_pull(clone):
    producer = clone("producer")
    storage = producer.root.parent / "dpo-pipeline-storage"  # a sibling of the work tree, shared by clones
    remotes = producer.dvc("remote", "list").stdout
    # `dvc remote list` wraps long lines to the terminal width: compare without whitespace
    assert f"local{storage}(default)" in re.sub(r"\s+", "", remotes), remotes
    assert "url = ../../dpo-pipeline-storage" in (producer.root / ".dvc" / "config").read_text()
    assert producer.dvc("config", "core.remote").stdout.strip() == "local"
    assert producer.dvc("config", "remote.local.verify").stdout.strip() == "true"
    producer.dvc("push")
    assert remote_objects(storage)

    consumer = clone("consumer", cache=False, checkout=False)
    assert consumer.root.parent == producer.root.parent
    assert not (consumer.root / "models" / "adapter").exists()
    consumer.dvc("pull")
    for rel in DIR_OUTS:
        assert same_tree(producer.root / rel, consumer.root / rel), rel
    assert_nothing_reruns(consumer)


@pytest.fixture
def ssh_url(sshd, tmp_path):
    store = tmp_path / "ssh-store"
    return f"ssh://{sshd['user']}@{sshd['host']}:{sshd['port']}{store}", store


def add_ssh_remote(project, url: str, keyfile: str, commit: bool) -> None:
    if commit:  # the remote's URL is shared team config (.dvc/config, in git) ...
        project.dvc("remote", "add", "-d", "ssh", url)
        project.dvc("remote", "modify", "ssh", "verify", "true")
        project.commit("ssh remote")
    # ... the key is each user's own (.dvc/config.local, git-ignored)
    project.dvc("remote", "modify", "--local", "ssh", "keyfile", keyfile)


def test_ssh_remote_push_pull_verify(clone, sshd, ssh_url):
    url, store = ssh_url
    producer = clone("producer")
    add_ssh_remote(producer, url, sshd["keyfile"], commit=True)
    assert producer.dvc("config", "core.remote").stdout.strip() == "ssh"
    assert "keyfile" not in (producer.root / ".dvc" / "config").read_text()
    push = producer.dvc("push")
    objects = remote_objects(store)
    assert objects, push.stdout
    assert (
        producer.dvc("status", "--cloud")
        .stdout.strip()
        .startswith(("Cache and remote 'ssh' are in sync", UP_TO_DATE))
    )

    # A teammate: fresh clone of the producer's branch, no cache, pulls everything over SSH.
    consumer = clone("consumer", source=producer, cache=False, checkout=False)
    add_ssh_remote(consumer, url, sshd["keyfile"], commit=False)
    consumer.dvc("pull")
    for rel in DIR_OUTS:
        assert same_tree(producer.root / rel, consumer.root / rel), rel
    assert_nothing_reruns(consumer)

    # Bit rot on the server: flip one byte of the adapter's weights object.
    adapter = producer.root / "models" / "adapter"
    weights = next(p for p in sorted(adapter.iterdir()) if p.suffix == ".safetensors")
    md5 = _md5(weights)
    target = store / "files" / "md5" / md5[:2] / md5[2:]
    assert target in objects
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

    victim = clone("victim", source=producer, cache=False, checkout=False)
    add_ssh_remote(victim, url, sshd["keyfile"], commit=False)
    result = victim.dvc("pull", check=False)
    assert result.returncode != 0, result.stdout
    message = result.stdout + result.stderr
    # DVC's words: the pull fails and names the output it could not restore ...
    assert "failed to pull data from the cloud" in message, message
    assert "Checkout failed for following targets:\nmodels/adapter" in message, message
    # ... and with -v it names the corrupted object: `verify = true` re-hashed the download and dropped it.
    # (`dvc fetch` alone still exits 0 and counts the file as fetched: the failure surfaces at checkout.)
    cached = victim.cache_dir / "files" / "md5" / md5[:2] / md5[2:]
    verbose = victim.dvc("fetch", "-v", check=False)
    assert f"corrupted cache file '{cached}'" in verbose.stdout + verbose.stderr
    assert not cached.exists()
    # the corrupted bytes never reach the workspace
    assert not (victim.root / "models" / "adapter").exists()
    # everything else arrived intact
    assert same_tree(producer.root / "data" / "prepared", victim.root / "data" / "prepared")


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()
