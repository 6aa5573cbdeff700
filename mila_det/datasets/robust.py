"""A training-dataset wrapper that replaces unusable samples instead of
ending the run.

On COCO-sized data a single corrupt or mislabelled image otherwise stops
training with ``AssertionError: failed to load image`` hours in, whenever
the sampler reaches it.
"""
from typing import Any, List, Optional, Tuple, Union

import numpy as np
from mmdet.registry import DATASETS
from mmengine.dataset import BaseDataset
from mmengine.structures import BaseDataElement


class BadSampleError(RuntimeError):
    """No usable sample was found after ``max_retries`` replacements."""


def replacement_index(index: int, attempt: int, size: int) -> int:
    """The sample drawn in place of ``index`` at its ``attempt``-th retry:
    a fixed function of ``(index, attempt)``, never ``index`` itself (for
    ``size > 1``), independent of any random state, so a resumed run draws
    what the uninterrupted one drew, also with dataloader workers."""
    if size < 2:
        return index
    state = np.random.SeedSequence((int(index), int(attempt), 0x5EED))
    offset = 1 + int(state.generate_state(1)[0]) % (size - 1)
    return (index + offset) % size


@DATASETS.register_module()
class SkipBadSamples:
    """Wrap a training dataset so an image that cannot be read or decoded,
    or whose decoded size disagrees with its annotation, is replaced by
    another sample (batches keep their size).

    The replacement is :func:`replacement_index` of the index and the retry
    count, so runs stay reproducible and resumable. Each replaced image is
    noted as ``(img_path, reason)`` in the replacement's data sample
    metainfo under ``skipped_samples``; :class:`~mila_det.hooks.
    SkippedSamplesHook` warns, lists and enforces the limit from those
    notes in the main process (also with dataloader workers).
    ``ResumableEpochBasedTrainLoop`` puts this wrapper around every
    config's train dataset; validation and test datasets are never wrapped:
    there an unreadable image stops evaluation with the image's path
    (MMCV's ``failed to load image: <path>``) rather than leaving it out of
    the metrics.

    Args:
        dataset (dict | BaseDataset): The dataset or its config.
        max_retries (int): Replacements tried for one index before giving
            up with :class:`BadSampleError`. Defaults to 20.
        check_size (bool): Compare the decoded image's size with the
            annotation's ``height``/``width``. Defaults to True.
    """

    def __init__(self, dataset: Union[dict, BaseDataset],
                 max_retries: int = 20, check_size: bool = True) -> None:
        if isinstance(dataset, dict):
            dataset = DATASETS.build(dataset)
        self.dataset = dataset
        self.max_retries = max_retries
        self.check_size = check_size

    def __getattr__(self, name: str) -> Any:
        # metainfo, get_data_info, full_init ... of the wrapped dataset
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def _size_mismatch(self, index: int, data: Any) -> Optional[str]:
        sample = data.get('data_samples') if isinstance(data, dict) else None
        if not self.check_size or not isinstance(sample, BaseDataElement):
            return None
        shape = sample.metainfo.get('ori_shape')
        info = self.dataset.get_data_info(index)
        expected = (info.get('height'), info.get('width'))
        if shape is None or None in expected:
            return None
        if tuple(shape[:2]) != tuple(expected):
            return (f'decoded size {shape[1]}x{shape[0]} (w x h) differs '
                    f'from the annotated {expected[1]}x{expected[0]}')
        return None

    def _path(self, index: int) -> str:
        try:
            info = self.dataset.get_data_info(index)
        except Exception:  # noqa: BLE001  (only for the message)
            return f'sample {index}'
        return str(info.get('img_path', f'sample {index}'))

    def __getitem__(self, index: int) -> Any:
        skipped: List[Tuple[str, str]] = []
        current = index
        for attempt in range(self.max_retries + 1):
            try:
                data = self.dataset[current]
                reason = self._size_mismatch(current, data)
            except Exception as err:  # noqa: BLE001  (any reading failure)
                data, reason = None, f'{type(err).__name__}: {err}'
            if reason is None:
                if skipped and isinstance(data, dict) and isinstance(
                        data.get('data_samples'), BaseDataElement):
                    data['data_samples'].set_metainfo(
                        dict(skipped_samples=skipped))
                return data
            skipped.append((self._path(current), reason))
            current = replacement_index(index, attempt, len(self.dataset))
        listing = '; '.join(f'{p}: {r}' for p, r in skipped)
        raise BadSampleError(
            f'no usable training sample for index {index} after '
            f'{self.max_retries} replacements: {listing}')
