"""Several sources as one: ``MultiSource`` reads each source on its own thread and hands the
pipeline their frames round-robin, each frame tagged with its source's name.

One engine serves every camera (one copy of the weights, one CUDA context). Per source:

- its own capture thread, so a camera that stalls or reconnects (the source's own back-off)
  holds up nobody else; it shows as ``up: false`` in the stats;
- its own queue of one frame: a live source keeps only its newest frame (drop-oldest, counted
  per source), a file blocks only itself (one frame waiting and one in its capture thread's
  hand are enough to keep the batches full: a second waiting 1080p frame per file cost 25 MiB
  at 4 files and no FPS);
- round-robin hand-out: at most one frame per source per turn, so a fast camera cannot starve a
  slow one.

The pipeline takes frames with ``take`` when it has an input buffer free for them (so a frame
waits in its own source's queue, where a newer one replaces it, never in a pipeline queue) and
gathers what is ready into one batch; it treats the whole as one non-live source (the dropping
happened here, per source, where it is fair). The run ends when every source has ended.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from device.sources import Frame, Source

POLL_S = 0.05
DOWN_AFTER_S = 5.0  # a source without a new frame for this long is reported down
# close() waits this long for the capture threads to see the stop: a thread left inside an
# OpenCV read when the interpreter exits aborts the process ("FATAL: exception not rethrown",
# exit -6: two paced cameras and --max-frames did)
CLOSE_WAIT_S = 2.0


class Taken(NamedTuple):
    """A frame as ``take`` hands it out."""

    frame: Frame
    captured_at: float  # perf_counter when the source's thread had it in hand
    read_ms: float  # how long the read took


@dataclass
class _Feed:
    name: str
    source: Source
    waiting: queue.Queue = field(default_factory=queue.Queue)
    captured: int = 0
    handed: int = 0
    dropped: int = 0
    ended: bool = False
    last_frame: Optional[float] = None  # monotonic
    error: Optional[BaseException] = None


class MultiSource(Source):
    """``named``: (name, opened source) pairs; the names are the topic levels of the frames."""

    live = False  # see the module docstring: drops happen per source, here

    def __init__(self, named: Sequence[Tuple[str, Source]]) -> None:
        super().__init__(",".join(name for name, _ in named))
        self.feeds = [_Feed(name, source, queue.Queue(maxsize=1))
                      for name, source in named]
        self._arrived = threading.Event()
        self._turn = 0
        self._threads: List[threading.Thread] = []
        self._started = False

    # counters summed over the sources (the pipeline's totals)
    @property
    def decode_errors(self) -> int:
        return sum(feed.source.decode_errors for feed in getattr(self, "feeds", []))

    @decode_errors.setter
    def decode_errors(self, _value: int) -> None:
        pass  # the base class initialises it; the sources count their own

    @property
    def reconnects(self) -> int:
        return sum(feed.source.reconnects for feed in getattr(self, "feeds", []))

    @reconnects.setter
    def reconnects(self, _value: int) -> None:
        pass

    def per_source(self) -> Dict[str, Dict[str, Any]]:
        """The stats message's ``sources`` section."""
        now = time.monotonic()
        return {feed.name: self._status(feed, now) for feed in self.feeds}

    @staticmethod
    def _status(feed: _Feed, now: float) -> Dict[str, Any]:
        age = None if feed.last_frame is None else round(now - feed.last_frame, 3)
        return {"frames": feed.handed, "dropped_frames": feed.dropped,
                "decode_errors": feed.source.decode_errors, "reconnects": feed.source.reconnects,
                "last_frame_age_s": age, "up": age is not None and age < DOWN_AFTER_S,
                "ended": feed.ended}

    def start(self, stop: threading.Event) -> None:
        """Start each source's capture thread (once)."""
        if self._started:
            return
        self._started = True
        for feed in self.feeds:
            thread = threading.Thread(target=self._capture, args=(feed, stop),
                                      name=f"jetyolo-capture-{feed.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        while True:
            taken = self.take(stop)
            if taken is None:
                return
            yield taken.frame

    def take(self, stop: threading.Event, timeout_s: Optional[float] = None) -> Optional[Taken]:
        """The next frame round-robin, waiting at most ``timeout_s`` (None: until one comes);
        None when none came in time, or at the end (``exhausted``). Re-raises a source's
        error."""
        self.start(stop)
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        while True:
            self._arrived.clear()
            taken = self._next_waiting()
            if taken is not None:
                return taken
            if self.exhausted(stop):
                return None
            wait = POLL_S if deadline is None else min(POLL_S, deadline - time.perf_counter())
            if wait <= 0:
                return None
            self._arrived.wait(wait)

    def exhausted(self, stop: threading.Event) -> bool:
        """True on stop, or when every source has ended and its queue is empty."""
        return stop.is_set() or all(feed.ended and feed.waiting.empty() for feed in self.feeds)

    def _capture(self, feed: _Feed, stop: threading.Event) -> None:
        try:
            frames = feed.source.frames(stop)
            while True:
                started = time.perf_counter()
                frame = next(frames, None)
                if frame is None:
                    return
                in_hand = time.perf_counter()
                frame.source = feed.name
                feed.captured += 1
                feed.last_frame = time.monotonic()
                self._queue(feed, Taken(frame, in_hand, (in_hand - started) * 1000.0), stop)
                self._arrived.set()
        except BaseException as exc:  # handed to the pipeline by take
            feed.error = exc
        finally:
            feed.ended = True
            self._arrived.set()

    def _queue(self, feed: _Feed, frame: Taken, stop: threading.Event) -> None:
        if feed.source.live:  # keep the newest frame; the older one is dropped and counted
            while True:
                try:
                    feed.waiting.put_nowait(frame)
                    return
                except queue.Full:
                    try:
                        feed.waiting.get_nowait()
                        feed.dropped += 1
                    except queue.Empty:
                        pass
        while not stop.is_set():  # a file waits for its turn: no frame is lost
            try:
                feed.waiting.put(frame, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _next_waiting(self) -> Optional[Taken]:
        """A waiting frame, round-robin from the source after the last one served."""
        count = len(self.feeds)
        for offset in range(count):
            feed = self.feeds[(self._turn + offset) % count]
            if feed.error is not None:
                raise feed.error
            try:
                taken: Taken = feed.waiting.get_nowait()
            except queue.Empty:
                continue
            self._turn = (self._turn + offset + 1) % count
            feed.handed += 1
            return taken
        return None

    def still_reading(self) -> List[str]:
        """Names of the sources whose capture thread is still in a read."""
        return [thread.name for thread in self._threads if thread.is_alive()]

    def close(self) -> None:
        deadline = time.monotonic() + CLOSE_WAIT_S  # a live read returns within a frame
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = {name.replace("jetyolo-capture-", "") for name in self.still_reading()}
        for feed in self.feeds:
            if feed.name not in stuck:  # never release a camera under a blocked read
                feed.source.close()
