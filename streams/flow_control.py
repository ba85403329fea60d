"""Faust's flow control, without the resume that empties the agents' buffers while records flow.

Faust (faust-streaming 0.15, through mode's ``FlowControlEvent``) clears every agent's buffer whenever
flow control is resumed, even when it is already running. Table recovery resumes it while records
already flow: it resumes the stream partitions, seeks them to their committed offsets, and only then
resumes flow control, a second time. Records the worker handed to its agents in between are thrown
away without a trace, and nothing reads them again: Faust's committed offset steps over one missing
record at its head, so a lone dropped order was lost for good, and two or more held the partition's
commits where they were until the next rebalance. Two workers lost orders like this when the second
joined under load, between its "Seek stream partitions to committed offsets" and "Worker ready".

A buffer needs emptying only when flow resumes after a suspension: a suspension belongs to a
rebalance, and what was buffered before it is read again from the committed offsets. So a resume
clears the buffers only when flow control was suspended.
"""

from __future__ import annotations

from mode.utils.queues import FlowControlEvent


class FlowControl(FlowControlEvent):
    def resume(self) -> None:
        if self.is_active():
            return
        super().resume()
