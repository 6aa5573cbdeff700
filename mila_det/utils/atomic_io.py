"""Writes that never leave a half-written file under the final name.

A file is written to a temporary name in the same folder, flushed to disk
(``fsync``), renamed into place (``os.replace``, atomic on POSIX file
systems) and the folder's entry is flushed too. A crash leaves either the
old file or the new one, plus at worst a stray temporary file; a failed
write (full disk, I/O error) removes its temporary file and raises
:class:`AtomicWriteError`, whose message names the folder, its free space
and the size the write needed.
"""
import errno
import os
import os.path as osp
import shutil
from typing import Optional, Union

TMP_SUFFIX = '.tmp'


class AtomicWriteError(OSError):
    """A write that failed and was rolled back (no partial file remains).

    Attributes:
        path (str): The file that was to be written.
        needed (int, optional): Bytes the write needed, when known.
        free (int, optional): Free bytes in the folder at the failure.
    """

    def __init__(self, message: str, path: str, err_no: Optional[int],
                 needed: Optional[int], free: Optional[int]) -> None:
        super().__init__(err_no, message)
        self.message = message
        self.path = path
        self.needed = needed
        self.free = free

    def __str__(self) -> str:
        return self.message


def temporary_name(path: str) -> str:
    """The temporary name ``path`` is written under before the rename:
    ``<folder>/.<name>.tmp`` (hidden, so globs like ``iter_*.pth`` never
    match it)."""
    folder, name = osp.split(path)
    return osp.join(folder, f'.{name}{TMP_SUFFIX}')


def format_bytes(count: Optional[int]) -> str:
    """``count`` bytes as a short human-readable size ("38.2 MB")."""
    if count is None:
        return 'unknown'
    for unit in ('B', 'kB', 'MB', 'GB', 'TB'):
        if abs(count) < 1000 or unit == 'TB':
            return f'{count:.0f} {unit}' if unit == 'B' else \
                f'{count:.1f} {unit}'
        count /= 1000
    return f'{count:.1f} TB'  # not reached


def free_bytes(folder: str) -> Optional[int]:
    """Free bytes for an unprivileged writer in ``folder``; None when the
    folder cannot be queried."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def fsync_file(path: str) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str) -> None:
    """Flush ``folder``'s entries (a rename in it) to disk; a no-op where
    folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def write_failure(path: str, err: OSError, needed: Optional[int],
                  what: str = 'file') -> AtomicWriteError:
    """The :class:`AtomicWriteError` for a failed write of ``path``."""
    folder = osp.dirname(osp.abspath(path))
    free = free_bytes(folder)
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason = 'no space left on device'
    message = (f'could not write {what} {osp.basename(path)} to {folder}: '
               f'{reason}; free space there: {format_bytes(free)}, needed: '
               f'{format_bytes(needed)}. Nothing partial was left: the '
               'write went to a temporary file, now removed.')
    return AtomicWriteError(message, path, err.errno, needed, free)


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def commit(tmp_path: str, path: str) -> None:
    """Flush the completely written ``tmp_path`` and rename it to ``path``
    (then flush the folder)."""
    fsync_file(tmp_path)
    os.replace(tmp_path, path)
    fsync_folder(osp.dirname(osp.abspath(path)))


def atomic_write(path: str, data: Union[bytes, str],
                 what: str = 'file') -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync,
    rename).

    Args:
        path (str): Destination file; its folder must exist.
        data (bytes | str): The content; ``str`` is written as UTF-8.
        what (str): What the file is, for the error message. Defaults to
            'file'.

    Raises:
        AtomicWriteError: The write failed; ``path`` is unchanged and no
            temporary file remains.
    """
    if isinstance(data, str):
        data = data.encode('utf-8')
    tmp_path = temporary_name(path)
    try:
        with open(tmp_path, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_folder(osp.dirname(osp.abspath(path)))
    except OSError as err:
        remove_quietly(tmp_path)
        raise write_failure(path, err, len(data), what) from err
