"""Interleaved step timing and per-process peak memory.

On a shared machine the speed of the CPU drifts while a benchmark runs
(other processes, frequency scaling, thermal state). Timing method A for
a while and then method B turns that drift into a difference between A
and B. `interleave` runs one step of each method in turn, round after
round (A B C A B C ...), so that drift hits every method alike, and
reports medians, which ignore the odd preempted step.

`peak_rss` runs a function in a fresh process and reads that process's
peak resident set size from the kernel. It counts everything the process
touched: the Python interpreter, the imported frameworks, their thread
pools and allocator caches, as well as tensors. Compare methods only by
the difference to a `baseline` function that does the same imports and
setup but not the work being measured.
"""

import dataclasses
import multiprocessing
import os
import resource
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-step wall-clock times of one method, in seconds.

    Attributes:
        samples: every timed step, in the order they ran.
        others: for each sample, the CPU (in cores) used meanwhile by
            processes other than this one and its descendants, or None
            where that could not be read (it needs Linux's /proc).
        median: the median step time.
        q1: the first quartile.
        q3: the third quartile.
        spread: the interquartile range relative to the median,
            `(q3 - q1) / median`; above ~0.1 the run was noisy.
    """

    samples: tuple
    others: tuple = ()

    @property
    def median(self):
        return statistics.median(self.samples)

    @property
    def q1(self):
        return _quantile(self.samples, 0.25)

    @property
    def q3(self):
        return _quantile(self.samples, 0.75)

    @property
    def spread(self):
        return (self.q3 - self.q1) / self.median

    def __str__(self):
        return (
            f"{self.median * 1e3:8.1f} ms  "
            f"[{self.q1 * 1e3:.1f}, {self.q3 * 1e3:.1f}]  "
            f"spread {self.spread:.0%}"
        )


def _quantile(samples, q):
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=4, method="inclusive")[
        int(q * 4) - 1
    ]


def _own_pids():
    """This process and its descendants, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
    own = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in own and pid not in own:
                own.add(pid)
                grew = True
    return own


def _cpu_ticks(pids):
    """`(machine busy ticks, ticks of pids)`, or None without /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...
    busy = sum(fields[:8]) - fields[3] - fields[4]
    own = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            own += int(stat[11]) + int(stat[12])  # utime, stime
        except OSError:
            pass
    return busy, own


def interleave(steps, rounds=20, warmup=3, repeat=1):
    """Times several step functions in alternation.

    Args:
        steps: a dict from method name to a zero-argument callable that
            runs one step and returns only when its work is done (for
            TensorFlow, read a result back, e.g. with `.numpy()`; for
            asynchronous PyTorch devices, synchronize).
        rounds: how many timed samples to take of each method.
        warmup: untimed calls of each method before the first round, for
            tracing, compilation, allocator and cache warm-up. Warm-up also
            runs in alternation, so every method starts from the same
            state of the machine.
        repeat: calls per sample; a sample is their mean. Use more than
            one for steps shorter than a few milliseconds.

    Returns:
        A dict from method name to `Timing`, in the order of `steps`.

    Raises:
        ValueError: if `steps` is empty or `rounds` or `repeat` is below 1.
    """
    if not steps:
        raise ValueError("Expected at least one step function; got none.")
    if rounds < 1 or repeat < 1:
        raise ValueError(
            f"Expected rounds >= 1 and repeat >= 1; got rounds={rounds}, "
            f"repeat={repeat}."
        )
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples = {name: [] for name in steps}
    others = {name: [] for name in steps}
    pids = _own_pids()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for _ in range(rounds):
        for name, step in steps.items():
            before = _cpu_ticks(pids)
            start = time.perf_counter()
            for _ in range(repeat):
                step()
            elapsed = time.perf_counter() - start
            after = _cpu_ticks(pids)
            samples[name].append(elapsed / repeat)
            if before is None or after is None:
                others[name].append(None)
            else:
                foreign = (after[0] - before[0]) - (after[1] - before[1])
                others[name].append(max(foreign, 0) / tick / elapsed)
    return {
        name: Timing(tuple(samples[name]), tuple(others[name]))
        for name in steps
    }


def quiet_rounds(timings, max_others=0.25):
    """Keeps only the rounds in which other processes stayed idle.

    A round is kept when, during every method's sample of it, processes
    outside this one and its descendants used at most `max_others` cores.
    On a machine shared with other work this compares methods under the
    same (low) contention; methods differ in how badly they suffer from
    a busy core, so mixing loaded and quiet rounds blurs the ratios.

    Args:
        timings: the result of `interleave`.
        max_others: the largest tolerated load from other processes, in
            cores.

    Returns:
        A dict like `timings` holding only the kept rounds, or an empty
        dict if none was kept or the load could not be read.
    """
    names = list(timings)
    count = len(timings[names[0]].samples)
    keep = [
        r
        for r in range(count)
        if all(
            timings[n].others
            and timings[n].others[r] is not None
            and timings[n].others[r] <= max_others
            for n in names
        )
    ]
    if not keep:
        return {}
    return {
        n: Timing(
            tuple(timings[n].samples[r] for r in keep),
            tuple(timings[n].others[r] for r in keep),
        )
        for n in names
    }


def ratios(timings, reference):
    """Median step time of each method divided by the reference's.

    Args:
        timings: the result of `interleave`.
        reference: the name of the method to divide by.

    Returns:
        A dict from method name to ratio of medians.
    """
    base = timings[reference].median
    return {name: t.median / base for name, t in timings.items()}


def paired_ratios(timings, reference):
    """Per-round ratio to the reference, summarised by its median.

    Each round's sample of a method is divided by the reference's sample
    of the same round, which ran moments apart under nearly the same load
    from other processes; the median of those ratios is steadier on a
    busy machine than the ratio of medians.

    Args:
        timings: the result of `interleave`.
        reference: the name of the method to divide by.

    Returns:
        A dict from method name to `(median, q1, q3)` of per-round ratios.
    """
    base = timings[reference].samples
    result = {}
    for name, t in timings.items():
        per_round = [a / b for a, b in zip(t.samples, base)]
        result[name] = (
            statistics.median(per_round),
            _quantile(per_round, 0.25),
            _quantile(per_round, 0.75),
        )
    return result


def format_table(timings, reference=None):
    """Formats `interleave` results as aligned text lines, one a method."""
    width = max(len(name) for name in timings)
    rel = ratios(timings, reference) if reference else {}
    lines = []
    for name, t in timings.items():
        line = f"{name:<{width}}  {t}"
        if reference:
            line += f"  {rel[name]:.2f}x {reference}"
        lines.append(line)
    return "\n".join(lines)


def _peak_kib():
    """This process's peak resident set size since it was exec'ed, KiB.

    Linux's VmHWM belongs to the address space, which exec replaces; the
    `ru_maxrss` of getrusage survives exec and so would report the peak
    of the parent that forked this process, which is why it is only the
    fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(target, args, queue):
    try:
        result = target(*args)
        queue.put((_peak_kib(), result, None))
    except BaseException as error:  # reported in the parent
        queue.put((None, None, repr(error)))


def peak_rss(target, *args, timeout=600):
    """Peak resident memory of a fresh process that runs `target(*args)`.

    The process is started with the "spawn" method, so it imports nothing
    from the parent but the module that defines `target`; `target` must be
    a module-level function. The figure is the kernel's high-water mark
    of resident memory (VmHWM on Linux): the largest resident set the
    process had at any time, imports and runtime included, and shared
    pages counted in full. Subtract the figure of a
    baseline target that does the same imports and setup.

    Args:
        target: a picklable module-level function.
        *args: picklable arguments for it.
        timeout: seconds to wait for the process.

    Returns:
        `(peak_mib, result)`: the peak in MiB and what `target` returned
        (it must be picklable).

    Raises:
        RuntimeError: if the process failed, died or timed out.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(target, args, queue))
    process.start()
    try:
        peak_kib, result, error = queue.get(timeout=timeout)
    except Exception as timeout_error:
        process.kill()
        process.join()
        raise RuntimeError(
            f"Measuring {target.__name__} failed: the process "
            f"(exit code {process.exitcode}) sent no result within "
            f"{timeout} s."
        ) from timeout_error
    process.join()
    if error is not None:
        raise RuntimeError(f"Measuring {target.__name__} failed: {error}")
    return peak_kib / 1024.0, result


def _serve(factory, args, connection):
    try:
        step = factory(*args)
        connection.send(("ready", None))
    except BaseException as error:
        connection.send(("error", repr(error)))
        return
    while True:
        command = connection.recv()
        if command == "close":
            return
        try:
            connection.send(("done", step()))
        except BaseException as error:
            connection.send(("error", repr(error)))


class InProcess:
    """A step function that runs in its own process.

    `InProcess(factory, *args)` starts a fresh ("spawn") process, calls
    `factory(*args)` there to build a zero-argument step function, and
    then runs that step on every call, returning what it returned. A
    round trip costs well under a millisecond.

    Use it to compare methods that cannot share a process: different
    thread settings or environment variables (which TensorFlow reads once,
    when it starts), or frameworks whose thread pools would compete
    (TensorFlow's and PyTorch's idle workers spin for a while after each
    op). The process is ended by `close()` or on leaving a `with` block.

    Args:
        factory: a picklable module-level function returning the step.
        *args: picklable arguments for it.
        env: environment variables to set in the new process only.
        timeout: seconds to wait for the factory and for each step.
    """

    def __init__(self, factory, *args, env=None, timeout=600):
        import os

        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._timeout = timeout
        self._name = getattr(factory, "__name__", repr(factory))
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            self._process = context.Process(
                target=_serve, args=(factory, args, child), daemon=True
            )
            self._process.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        child.close()
        self._receive()

    def _receive(self):
        if not self._connection.poll(self._timeout):
            self.close()
            raise RuntimeError(
                f"{self._name}: no answer from its process within "
                f"{self._timeout} s."
            )
        try:
            status, value = self._connection.recv()
        except EOFError:
            status, value = "error", "the process died"
        if status == "error":
            self.close()
            raise RuntimeError(f"{self._name} failed in its process: {value}")
        return value

    def __call__(self):
        self._connection.send("step")
        return self._receive()

    def close(self):
        if self._process.is_alive():
            try:
                self._connection.send("close")
            except OSError:
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
