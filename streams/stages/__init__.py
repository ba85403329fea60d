"""Pure stage functions: an event and the state it needs in, the events to emit out.

Each stage updates the state object it is given in place and returns ``list[Event]``; the caller
persists the state (after sending the events, so a crash replays the input and re-emits the same,
deterministically identified events) and routes each Event by its ``type``.
"""
