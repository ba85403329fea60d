"""The app's flow control: resuming it empties the agents' buffers only after a suspension."""

from __future__ import annotations

import asyncio

from streams.faust_config import new_app
from streams.flow_control import FlowControl
from streams.settings import Settings


def test_resuming_running_flow_keeps_what_the_agents_buffers_hold(settings: Settings) -> None:
    app = new_app(settings.model_copy(update={"app_id": "unit-flow-control"}))
    assert isinstance(app.flow_control, FlowControl)

    async def scenario() -> tuple[int, int]:
        buffer = app.FlowControlQueue(maxsize=10, clear_on_resume=True)
        app.flow_control.resume()  # flow starts suspended, as in a worker before its first assignment
        buffer.put_nowait("delivered while flow runs")
        app.flow_control.resume()  # table recovery resumes flow control again after its seek
        kept = buffer.qsize()
        app.flow_control.suspend()  # a rebalance
        app.flow_control.resume()
        return kept, buffer.qsize()

    kept, after_suspension = asyncio.run(scenario())
    assert kept == 1
    # Buffered before a suspension, a record is read again from the committed offsets: the buffer empties.
    assert after_suspension == 0
