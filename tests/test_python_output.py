"""PythonSandbox output as a code interpreter shows it (issue 20 items 3 and 4): streamed stdout
and stderr (run(on_output=), stream(), run-python --stream), bounded against hostile guests and
consumers, and rich results (result.value, result.display, display(), matplotlib figures).
One sandbox booted per module, warm-started for every test."""

import asyncio
import contextlib
import pickle
import struct
import subprocess
import sys
import time
import zlib

import pytest

import whpfast
from whpfast.linux import process
from whpfast.python import sandbox as pysandbox

pytestmark = [pytest.mark.hypervisor]     # either backend (KVM, or WHP over tests/whv)

SETUP = "import os, sys, time\nimport pandas as pd"


@pytest.fixture(scope="module")
def sb():
    with whpfast.PythonSandbox(setup=SETUP, memory_size=256 << 20) as box:
        yield box


def streamed(sb, code, **kw):
    """(result, [(stream, text, host time)]) of run(code, on_output=...)."""
    seen = []
    result = sb.run(code, on_output=lambda s, t: seen.append((s, t, time.monotonic())), **kw)
    return result, seen


def joined(seen, stream):
    return "".join(t for s, t, *_ in seen if s == stream)


# -- streamed output -----------------------------------------------------------------------------

def test_stdout_and_stderr_stream_in_the_order_written(sb):
    code = "for i in range(3):\n    print('out', i)\n    print('err', i, file=sys.stderr)\nprint('é' * 3)"
    result, seen = streamed(sb, code)
    assert [(s, t) for s, t, _ in seen] == [
        ("stdout", "out 0\n"), ("stderr", "err 0\n"), ("stdout", "out 1\n"), ("stderr", "err 1\n"),
        ("stdout", "out 2\n"), ("stderr", "err 2\n"), ("stdout", "ééé\n")]
    assert (result.stdout, result.stderr, result.error) == ("out 0\nout 1\nout 2\nééé\n",
                                                           "err 0\nerr 1\nerr 2\n", None)
    assert result == sb.run(code)                        # the same result, collected at the end


def test_utf8_split_across_writes_comes_whole(sb):
    code = "os.write(1, b'caf\\xc3')\nos.write(1, b'\\xa9 \\xf0\\x9f')\nos.write(1, b'\\x98\\x80!')\nos.write(2, b'\\xc3')"
    result, seen = streamed(sb, code)
    assert joined(seen, "stdout") == result.stdout == "café \U0001F600!"
    assert joined(seen, "stderr") == result.stderr == "\ufffd"     # cut at the end: replaced
    assert all("\ufffd" not in t for s, t, _ in seen if s == "stdout")


def test_a_burst_of_lines_is_batched_and_lines_come_whole(sb):
    result, seen = streamed(sb, "for i in range(10000):\n    print('line', i)")
    want = "".join(f"line {i}\n" for i in range(10000))
    assert result.stdout == joined(seen, "stdout") == want
    assert len(seen) < 1000, len(seen)                  # batches, not 10,000 write exits
    assert all(t.endswith("\n") for _, t, _ in seen)


def test_nobody_listening_costs_no_write_exits(sb):
    code = "for i in range(2000):\n    print(i)"
    lx = sb.linux
    before = lx.syscall_count
    assert sb.run(code).stdout.count("\n") == 2000
    quiet = lx.syscall_count - before
    before = lx.syscall_count
    streamed(sb, code)
    assert quiet < 10 and lx.syscall_count - before > quiet


def test_a_progress_bar_shows_live(sb):
    """What tqdm does: '\\r' + the bar on stderr, flushed, between steps of work."""
    code = ("for i in range(5):\n    sys.stderr.write(f'\\r{i * 25:3d}%|' + '#' * i)\n"
            "    sys.stderr.flush()\n    time.sleep(0.05)\nsys.stderr.write('\\n')")
    t0 = time.monotonic()
    result, seen = streamed(sb, code)
    end = time.monotonic()
    bars = [(t, at) for s, t, at in seen if s == "stderr" and "%" in t]
    assert [t for t, _ in bars] == [f"\r{i * 25:3d}%|" + "#" * i for i in range(5)]
    assert bars[0][1] - t0 < 0.15 and end - bars[0][1] > 0.15      # the first long before the end
    assert all(b[1] - a[1] > 0.03 for a, b in zip(bars, bars[1:]))  # each as it was written
    assert result.stderr == "".join(t for t, _ in bars) + "\n"


def test_the_first_line_reaches_the_host_at_once(sb):
    """The guest stamps its first line with the shared wall clock; the host receives it within
    a few ms (the bench measures the median: bench/bench_stream.py) while the cell goes on."""
    code = "print(time.time_ns())\nt = time.monotonic()\nwhile time.monotonic() - t < 0.2: pass"
    for _ in range(3):
        got = []
        sb.run(code, on_output=lambda s, t: got.append((t, time.time_ns())))
        lag = (got[0][1] - int(got[0][0])) / 1e6
        if lag < 20:
            break
    assert -5 < lag < 20, lag


def test_the_output_cap_holds_while_streaming(sb):
    cap = pysandbox.OUTPUT_LIMIT
    result, seen = streamed(sb, f"print('x' * {cap + 10}, end='')")
    marker = f"\n[whpfast: output truncated: {cap + 10} characters written, the first {cap} kept]\n"
    assert result.stdout == joined(seen, "stdout") == "x" * cap + marker


def test_raw_writes_past_the_linux_limit_are_cut_and_marked_in_the_stream(sb):
    result, seen = streamed(sb, "while True: os.write(1, b'y' * (1 << 20))", timeout=60)
    assert "OSError: [Errno 27]" in result.error
    marker = process.OUTPUT_MARKER.format(stream="stdout", limit=process.OUTPUT_LIMIT)
    assert result.stdout == joined(seen, "stdout") == "y" * process.OUTPUT_LIMIT + marker
    assert sb.run("print(1)").stdout == "1\n"


def test_a_raising_callback_stops_the_run_and_run_raises_it(sb):
    calls = []

    def stop(stream, text):
        calls.append(text)
        raise KeyError("enough")

    t0 = time.monotonic()
    with pytest.raises(KeyError, match="enough"):
        sb.run("while True: print('spam', flush=True)", on_output=stop, timeout=20)
    assert len(calls) == 1 and time.monotonic() - t0 < 5
    with pytest.raises(whpfast.SandboxError, match="fresh=True"):
        sb.run("print(0)", fresh=False)
    assert sb.run("print(2)").stdout == "2\n"


def test_a_slow_callback_counts_against_the_timeout(sb):
    t0 = time.monotonic()
    with pytest.raises(whpfast.GuestTimeout):
        sb.run("while True: print('x', flush=True)", on_output=lambda s, t: time.sleep(0.2),
               timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert sb.run("print(3)").stdout == "3\n"


def test_on_output_must_be_callable(sb):
    with pytest.raises(TypeError, match="on_output"):
        sb.run("pass", on_output="print")


# -- stream() ------------------------------------------------------------------------------------

def collect(sb, code, **kw):
    async def go():
        return [event async for event in sb.stream(code, **kw)]
    return asyncio.run(go())


def test_stream_gives_output_events_then_the_result(sb):
    events = collect(sb, "print('a', flush=True)\nprint('b', file=sys.stderr)\n6 * 7")
    *output, result = events
    assert output == [whpfast.Output("stdout", "a\n"), whpfast.Output("stderr", "b\n")]
    assert isinstance(result, whpfast.PythonResult) and result.value == "42"
    assert (result.stdout, result.stderr) == ("a\n", "b\n")


def test_stream_raises_what_run_raises(sb):
    with pytest.raises(whpfast.GuestTimeout):
        collect(sb, "print('start', flush=True)\nwhile True: pass", timeout=0.5)
    assert collect(sb, "1/0")[-1].error.type == "ZeroDivisionError"


def test_leaving_a_stream_early_cancels_its_run(sb):
    async def go():
        t0 = time.monotonic()
        async with contextlib.aclosing(sb.stream("while True: print('spam', flush=True)",
                                                 timeout=30)) as events:
            async for event in events:
                # (flushes the consumer has not taken yet come merged in one event)
                assert event.stream == "stdout" and set(event.text.splitlines()) == {"spam"}
                break
        return time.monotonic() - t0

    assert asyncio.run(go()) < 5
    assert sb.run("print(4)").stdout == "4\n"


def test_a_slow_consumer_holds_the_guest_and_the_host_buffers_boundedly(sb, monkeypatch):
    """A guest printing without end to a consumer that does not keep up: at most
    STREAM_PENDING_EVENTS events wait (the guest waits meanwhile), and the run's timeout still
    ends it, so the consumer never waits forever."""
    monkeypatch.setattr(pysandbox, "STREAM_PENDING_EVENTS", 8)
    peak = []
    put = pysandbox._Channel.put

    def counting_put(self, stream, text):
        put(self, stream, text)
        peak.append(len(self.events))

    monkeypatch.setattr(pysandbox._Channel, "put", counting_put)
    code = "i = 0\nwhile True:\n    print(i, flush=True)\n    print(i, file=sys.stderr, flush=True)\n    i += 1"

    async def go():
        seen = 0
        with pytest.raises(whpfast.GuestTimeout):
            async for _ in sb.stream(code, timeout=1.5):
                seen += 1
                await asyncio.sleep(0.01)
        return seen

    t0 = time.monotonic()
    seen = asyncio.run(go())
    assert time.monotonic() - t0 < 10 and seen > 10
    assert max(peak) <= 8
    assert sb.run("print(5)").stdout == "5\n"


def test_a_guest_that_never_ends_a_line_still_ends_the_stream(sb):
    """Held text (no newline, no flush) cannot make the consumer wait past the timeout."""
    t0 = time.monotonic()
    with pytest.raises(whpfast.GuestTimeout):
        collect(sb, "print('partial', end='')\nwhile True: pass", timeout=0.5)
    assert time.monotonic() - t0 < 5


# -- rich results --------------------------------------------------------------------------------

def test_value_is_the_repr_of_the_last_expression(sb):
    assert sb.run("x = 2\nx * 21").value == "42"
    assert sb.run("'a' + 'b'").value == "'ab'"
    for code in ("x = 1", "print(1)", "None", "", "def f(): pass", "for i in range(2):\n    i"):
        r = sb.run(code)
        assert (r.value, r.display, r.error) == (None, [], None), code
    r = sb.run("1/0\n2")
    assert r.value is None and r.error.type == "ZeroDivisionError"
    r = sb.run("class R:\n    def __repr__(self): raise ValueError('no repr')\nR()")
    assert r.value is None and r.error.type == "ValueError" and "no repr" in r.error.message
    long = sb.run("'z' * (2 << 20)").value
    assert long.startswith("'zzz") and "repr truncated" in long and len(long) < (1 << 20) + 100


def test_a_dataframe_is_html_and_plain_text(sb):
    r = sb.run("pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    plain = "   a  b\n0  1  x\n1  2  y"
    assert r.value == plain and r.error is None
    [bundle] = r.display
    assert set(bundle) == {"text/plain", "text/html"} and bundle["text/plain"] == plain
    assert "<table" in bundle["text/html"] and "<td>x</td>" in bundle["text/html"]


RICH = '''
import base64
PNG = b"\\x89PNG\\r\\n\\x1a\\n" + bytes(range(256))
class Rich:
    def _repr_html_(self): return "<b>rich</b>"
    def _repr_png_(self): return PNG
    def _repr_json_(self): return {"k": [1, 2]}
    def __repr__(self): return "Rich()"
class B64:
    def _repr_png_(self): return base64.b64encode(PNG).decode()
class Bundle:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/markdown": "**md**", "image/jpeg": b"\\xff\\xd8"}, {"meta": 1}
class Broken:
    def _repr_html_(self): raise RuntimeError("broken html")
    def __repr__(self): return "Broken()"
class Anything:
    def __getattr__(self, name): return lambda *a, **k: "<i>everything</i>"
    def __repr__(self): return "Anything()"
'''
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def test_display_calls_and_repr_methods_give_mime_bundles(sb):
    r = sb.run(RICH + "display(Rich(), 3)\ndisplay(B64(), Bundle(), Anything())\n"
                      "display({'text/plain': 'raw', 'image/png': PNG}, raw=True)\nBroken()")
    assert r.error is None and r.value == "Broken()"
    rich, three, b64, bundle, anything, raw, *rest = r.display
    assert rich == {"text/html": "<b>rich</b>", "image/png": PNG, "application/json": {"k": [1, 2]},
                    "text/plain": "Rich()"}
    assert three == {"text/plain": "3"}
    assert b64["image/png"] == PNG and b64["text/plain"].startswith("<__main__.B64 object")
    assert bundle["text/markdown"] == "**md**" and bundle["image/jpeg"] == b"\xff\xd8"
    assert anything == {"text/plain": "Anything()"}        # answers every name: no rich reprs
    assert raw == {"text/plain": "raw", "image/png": PNG}
    assert rest == []                                      # Broken(): only plain text, not displayed
    assert "Broken._repr_html_() failed: RuntimeError: broken html" in r.stderr


def test_the_last_value_with_rich_reprs_is_displayed_after_display_calls(sb):
    r = sb.run(RICH + "display(1)\nRich()")
    assert r.value == "Rich()" and [b["text/plain"] for b in r.display] == ["1", "Rich()"]


def test_display_is_capped_per_run(sb):
    r = sb.run("class Big:\n    def _repr_html_(self): return 'h' * (3 << 20)\n"
               "for _ in range(4): display(Big())")
    assert r.error is None and len(r.display) == 2
    assert r.stderr.count("display output of") == 2 and "was dropped" in r.stderr
    assert sb.run("display(1)").display == [{"text/plain": "1"}]      # per run


def test_results_pickle_with_their_rich_fields(sb):
    r = sb.run(RICH + "display(Rich())\n1/0")
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.display[0]["image/png"] == PNG and back.error.type == "ZeroDivisionError"
    old = whpfast.PythonResult("out", "", None)             # the three-field form still works
    assert (old.value, old.display) == (None, [])


def test_forged_display_is_rejected(sb):
    frame = "m._frame = lambda a: m.MAGIC + len(B).to_bytes(8, 'little') + B"
    for display, why in (('[{"image/png": "not base64!"}]', "not base64"),
                         ('[{"text/html": 3}]', "not text"), ('[3]', "not an object"),
                         ('{}', "wrong field types")):
        body = ('{"stdout": "", "stderr": "", "error": null, "value": null, "display": %s}' % display)
        with pytest.raises(whpfast.GuestCallError, match=why):
            sb.run(f"import sys\nm = sys.modules['__main__']\nB = {body.encode()!r}\n{frame}")
    body = b'{"stdout": "", "stderr": "", "error": null, "value": 5, "display": []}'
    with pytest.raises(whpfast.GuestCallError, match="wrong field types"):
        sb.run(f"import sys\nm = sys.modules['__main__']\nB = {body!r}\n{frame}")
    assert sb.run("1 + 1").value == "2"


# -- matplotlib ----------------------------------------------------------------------------------

# matplotlib is not among the packages the tests install: a pyplot of the same interface,
# planted by setup code, drawing real PNGs (stdlib zlib), stands in for it.
FAKE_PYPLOT = '''
import struct, sys, types, zlib

def _png(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\\0" + b"\\xff\\x00\\x00" * w for _ in range(h))
    return (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))

class Figure:
    def __init__(self, num, size):
        self.num, self.size = num, size
    def savefig(self, f, format=None, bbox_inches=None):
        if self.size == (0, 0):
            raise ValueError("cannot draw an empty figure")
        assert format == "png"
        f.write(_png(*self.size))
    def __repr__(self):
        return f"<Figure size {self.size[0]}x{self.size[1]} with 1 Axes>"

plt = types.ModuleType("matplotlib.pyplot")
_open = {}
def figure(num=None, figsize=(2, 1)):
    if num is None:
        num = max(_open, default=0) + 1
    return _open.setdefault(num, Figure(num, figsize))
def close(which="all"):
    _open.clear()
plt.figure, plt.close, plt.get_fignums = figure, close, lambda: sorted(_open)
sys.modules["matplotlib"] = types.ModuleType("matplotlib")
sys.modules["matplotlib"].pyplot = sys.modules["matplotlib.pyplot"] = plt
import matplotlib.pyplot
'''


@pytest.fixture(scope="module")
def mpl_box():
    with whpfast.PythonSandbox(setup=FAKE_PYPLOT, memory_size=64 << 20) as box:
        yield box


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_open_figures_come_back_as_png_without_savefig(mpl_box):
    r = mpl_box.run("import matplotlib.pyplot as plt\nplt.figure(figsize=(3, 2))\n"
                    "plt.figure()\ndisplay('before')\n'done'")
    assert r.error is None and r.value == "'done'"
    before, first, second = r.display
    assert before == {"text/plain": "'before'"}
    assert first["text/plain"] == "<Figure size 3x2 with 1 Axes>" and png_size(first["image/png"]) == (3, 2)
    assert png_size(second["image/png"]) == (2, 1)
    data = first["image/png"]
    assert zlib.decompress(data[data.index(b"IDAT") + 4:-16])[:4] == b"\0\xff\0\0"
    # closed at the end of the cell: the next run (continuing) shows none
    assert mpl_box.run("import matplotlib.pyplot as plt\nplt.get_fignums()", fresh=False).value == "[]"


def test_a_figure_that_fails_to_draw_is_reported_not_raised(mpl_box):
    r = mpl_box.run("import matplotlib.pyplot as plt\nplt.figure(figsize=(0, 0))\nprint('ok')")
    assert r.error is None and r.stdout == "ok\n" and r.display == []
    assert "matplotlib figures not shown: ValueError: cannot draw an empty figure" in r.stderr


def test_the_figure_hook_is_a_no_op_without_pyplot(sb):
    assert "matplotlib.pyplot" not in sb.run("print(sorted(sys.modules))").stdout
    assert sb.run("os.environ['MPLBACKEND']").value == "'Agg'"
    assert sb.run("print('plain')").display == []


# -- the command line ----------------------------------------------------------------------------

def test_run_python_stream_writes_as_the_guest_writes(tmp_path):
    code = ("import sys, time\nprint('first', flush=True)\n"
            "time.sleep(1.5)\nprint('second')\nprint('warn', file=sys.stderr)")
    cmd = [sys.executable, "-m", "whpfast", "run-python", "--memory", "64", "--stream", "-c", code]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        first = proc.stdout.readline()
        got_first = time.monotonic()
        rest, err = proc.communicate(timeout=120)
        done = time.monotonic()
    finally:
        proc.kill()
    assert (first, rest, err, proc.returncode) == ("first\n", "second\n", "warn\n", 0)
    assert done - got_first > 1.0                 # the first line came before the sleep ended
