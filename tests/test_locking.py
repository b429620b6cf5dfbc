"""The build lock of a directory: one builder at a time, readers refused while it builds."""

import json
import subprocess
import sys
import textwrap

import pytest

from kd_lightning.locking import (
    LOCK_FILE_NAME,
    DirectoryLockedError,
    LockHolder,
    directory_lock,
    refuse_if_being_built,
)


def write_lock(directory, **fields):
    """A lock file as another process would have left it."""
    holder = {"pid": 4242, "host": "elsewhere", "command": "kd-cache teacher_cache=x", "started": "2026-01-01 10:00:00+0000", "token": "t"}
    holder.update(fields)
    (directory / LOCK_FILE_NAME).write_text(json.dumps(holder))
    return LockHolder(**holder)


def finished_pid():
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_names_its_holder_and_is_released_at_the_end(tmp_path):
    directory = tmp_path / "cache"
    with directory_lock(directory, command="kd-cache teacher_cache=cache") as holder:
        recorded = json.loads((directory / LOCK_FILE_NAME).read_text())
        assert recorded["pid"] == holder.pid and recorded["command"] == "kd-cache teacher_cache=cache"
        assert sorted(path.name for path in directory.iterdir()) == [LOCK_FILE_NAME]  # no private files left
    assert not (directory / LOCK_FILE_NAME).exists()
    refuse_if_being_built(directory)  # released: readers may go on


def test_the_lock_is_released_when_the_build_fails(tmp_path):
    with pytest.raises(KeyError), directory_lock(tmp_path):
        raise KeyError("the build failed")
    assert not (tmp_path / LOCK_FILE_NAME).exists()


def test_a_second_builder_is_refused_with_the_holder_and_what_to_do(tmp_path):
    with directory_lock(tmp_path, command="kd-cache first") as holder:
        with pytest.raises(DirectoryLockedError) as refused, directory_lock(tmp_path):
            pytest.fail("a second builder got the lock")
        assert refused.value.holder == holder
        message = str(refused.value)
        for expected in (f"pid {holder.pid}", holder.host, holder.started, "kd-cache first", "still running", "Wait",
                         str(tmp_path / LOCK_FILE_NAME)):
            assert expected in message
    assert not (tmp_path / LOCK_FILE_NAME).exists()  # the refused builder left the first one's lock alone until its end


def test_a_reader_is_refused_while_a_build_holds_the_lock(tmp_path):
    with directory_lock(tmp_path):
        with pytest.raises(DirectoryLockedError, match="cannot train from .* being built by pid"):
            refuse_if_being_built(tmp_path, "train from")


def test_a_builder_in_another_process_is_seen(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from kd_lightning.locking import directory_lock
        with directory_lock({str(tmp_path)!r}, command="kd-cache other"):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLockedError, match=f"pid {other.pid} .*kd-cache other"), directory_lock(tmp_path):
            pass
    finally:
        other.communicate("\n", timeout=30)
    with directory_lock(tmp_path):  # free once the other build ended
        pass


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path):
    import socket

    write_lock(tmp_path, pid=finished_pid(), host=socket.gethostname())
    with pytest.raises(DirectoryLockedError, match="no longer runs: the build was interrupted"):
        refuse_if_being_built(tmp_path)
    with directory_lock(tmp_path) as holder:
        assert json.loads((tmp_path / LOCK_FILE_NAME).read_text())["token"] == holder.token
    assert not (tmp_path / LOCK_FILE_NAME).exists()


def test_a_lock_from_another_host_is_kept_and_the_message_says_how_to_clear_it(tmp_path):
    write_lock(tmp_path)
    with pytest.raises(DirectoryLockedError, match="on elsewhere, started 2026-01-01 .*another host.*delete the lock file"):
        with directory_lock(tmp_path):
            pass
    assert (tmp_path / LOCK_FILE_NAME).exists()


def test_an_unreadable_lock_file_is_refused_not_ignored(tmp_path):
    (tmp_path / LOCK_FILE_NAME).write_text("{half a rec")
    with pytest.raises(DirectoryLockedError, match="not a lock record.*delete"):
        refuse_if_being_built(tmp_path)
    with pytest.raises(DirectoryLockedError, match="not a lock record"):
        with directory_lock(tmp_path):
            pass


def test_breaking_a_stale_lock_keeps_a_fresh_one_taken_in_the_meantime(tmp_path):
    from kd_lightning.locking import remove_stale_lock

    stale = write_lock(tmp_path, token="stale")
    fresh = write_lock(tmp_path, token="fresh")  # another builder replaced the stale lock first
    remove_stale_lock(tmp_path / LOCK_FILE_NAME, stale)
    assert json.loads((tmp_path / LOCK_FILE_NAME).read_text())["token"] == fresh.token
    assert [path.name for path in tmp_path.iterdir()] == [LOCK_FILE_NAME]
