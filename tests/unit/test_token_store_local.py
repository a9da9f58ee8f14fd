"""The per-machine store of used stream tokens (``serve --workers N`` without Redis)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app import machine_db
from app.twilio.stream_token import StreamTokens
from app.twilio.token_store import MachineTokenStore

CALL = "CA" + "1" * 32
SECRET = b"machine-store-test-secret-0123"


def test_a_nonce_is_used_once_whichever_connection_asks(tmp_path: Path) -> None:
    path = machine_db.create(tmp_path)
    first, second = MachineTokenStore(path), MachineTokenStore(path)  # two workers' connections
    try:
        assert first.use_once("nonce-a", 2000, now=1000) is None
        assert second.use_once("nonce-a", 2000, now=1001) == "already used"
        assert first.use_once("nonce-a", 2000, now=1002) == "already used"
        assert second.use_once("nonce-b", 2000, now=1002) is None
    finally:
        first.close()
        second.close()


def test_expired_nonces_are_forgotten(tmp_path: Path) -> None:
    store = MachineTokenStore(machine_db.create(tmp_path))
    try:
        for i in range(20):
            assert store.use_once(f"n{i}", 1060 + i, now=1000 + i) is None
        assert store.use_once("late", 9000, now=5000) is None
        assert store.remembered() == 1
    finally:
        store.close()


def test_past_the_bound_a_token_is_refused_not_stored(tmp_path: Path) -> None:
    store = MachineTokenStore(machine_db.create(tmp_path), max_remembered=3)
    try:
        for i in range(3):
            assert store.use_once(f"n{i}", 2000, now=1000) is None
        assert store.use_once("n3", 2000, now=1000) == "too many outstanding tokens"
        assert store.remembered() == 3
        assert store.use_once("n3", 3000, now=2001) is None  # the others expired
    finally:
        store.close()


def test_a_token_minted_by_one_worker_redeems_once_across_workers(tmp_path: Path) -> None:
    path = machine_db.create(tmp_path)
    worker_1 = StreamTokens(SECRET, machine=MachineTokenStore(path))
    worker_2 = StreamTokens(SECRET, machine=MachineTokenStore(path))
    try:
        token = worker_1.mint(CALL, now=1000)
        assert worker_2.redeem(token, CALL, now=1001) is None
        assert worker_1.redeem(token, CALL, now=1002) == "already used"
        assert worker_2.redeem(token, CALL, now=1003) == "already used"
    finally:
        for tokens in (worker_1, worker_2):
            assert tokens.machine is not None
            tokens.machine.close()


def test_racing_processes_each_nonce_is_granted_once(tmp_path: Path) -> None:
    """Real processes inserting the same nonces at once: every nonce granted exactly once."""
    path = machine_db.create(tmp_path)
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from app.twilio.token_store import MachineTokenStore\n"
        "store = MachineTokenStore(Path(sys.argv[1]))\n"
        "now = time.time()\n"
        "for i in range(200):\n"
        "    if store.use_once(f'n{i}', int(now) + 60, now) is None:\n"
        "        print(i)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    granted: list[int] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        granted += [int(line) for line in out.split()]
    assert sorted(granted) == list(range(200))
