"""The temporary folders of one gunicorn start: the metrics' and the writer process's socket.

Each is named after the start's master (`<prefix><pid>-...`), so that a later start can tell
the folders of a server that was killed (SIGKILL runs no hook to remove them) from those of
one still running, and remove the first only.
"""

import glob
import os
import shutil
import tempfile


def make_folder(prefix, parent=None):
    """A new folder (mode 0700) named after this process, in `parent` (the temporary
    directory by default), once the abandoned folders of `prefix` there are removed."""
    remove_abandoned_folders(prefix, parent)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def remove_abandoned_folders(prefix, parent=None):
    """Removes this user's folders `<prefix><pid>-...` in `parent` whose process is gone."""
    parent = parent or tempfile.gettempdir()
    for folder in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
        try:
            pid = int(os.path.basename(folder)[len(prefix):].split("-")[0])
            if os.stat(folder).st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, OSError):
            continue  # not one of ours, or its server still runs (maybe as another user)
