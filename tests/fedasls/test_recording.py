"""fedasls.recording: a block's record is its own, merged into the enclosing one when it ends."""

from __future__ import annotations

import threading

from fedasls.recording import Recording


def test_a_nested_block_records_apart_and_is_merged_into_the_outer_one_at_its_end():
    notes: Recording[list[str]] = Recording("test_notes", list, list.extend)
    assert notes.current() is None
    with notes.record() as outer:
        notes.current().append("a")
        with notes.record() as inner:
            notes.current().append("b")
            assert outer == ["a"]  # not merged yet
        assert inner == ["b"] and outer == ["a", "b"]
    assert notes.current() is None


def test_another_thread_does_not_write_into_this_threads_record():
    notes: Recording[list[str]] = Recording("test_notes_threads", list, list.extend)
    seen = []
    with notes.record() as mine:
        thread = threading.Thread(target=lambda: seen.append(notes.current()))
        thread.start()
        thread.join()
        notes.current().append("here")
    assert seen == [None] and mine == ["here"]
