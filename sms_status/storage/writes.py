"""Writes that run in SQLite's writer process under gunicorn (writer.py), or in place.

A function marked `@in_writer_process` takes the storage engine first. When the engine has
a writer process, a call crosses to that other process: it sends the function's name and
arguments there, where the function runs batched with other requests' writes, and waits
for the answer (writer.py's `Write` and `Answer`, as JSON: a tuple arrives as a list, and
a named tuple that the function is annotated to return is rebuilt as that type); otherwise
it runs in the calling thread. The mark says so where the function is defined, so that a
reader of a write knows it may not share the caller's process, memory or transaction.
"""

import functools
import time

from sms_status import metrics

# The functions marked @in_writer_process, by name: what the writer process may be asked
# to run.
WRITES = {}


def in_writer_process(function):
    """Marks a function that writes: it runs in the writer process when the engine has one
    (writer.py, under gunicorn), batched with other requests' writes, or else here."""
    WRITES[function.__name__] = function

    returns = function.__annotations__.get("return")  # a named tuple's is rebuilt from it

    @functools.wraps(function)
    def write(storage, *args, writer_timeout=None, **kwargs):
        """`writer_timeout`: at most this many seconds for the writer process's answer."""
        started = time.perf_counter()
        try:
            if storage.writer is not None:
                return storage.writer.call(function.__name__, args, kwargs, writer_timeout,
                                           returns)
            return function(storage, *args, **kwargs)
        finally:
            metrics.observe_write(function.__name__, time.perf_counter() - started)

    return write
