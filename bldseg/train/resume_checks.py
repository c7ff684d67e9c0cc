"""Whether a resumed run or search would train on the data it started on.

A run folder (``last.pt``, a K-fold run's ``folds.json``) and a search's record
(``bldseg_search.json``) keep the training cache's fingerprint and the decoding rules it was
decoded by (:func:`data_record`). Resumed on other data (masks fixed after an interruption),
a run would score its later epochs against other ground truth than its first and pick its best
epoch across both, a K-fold run's out-of-fold library would hold both versions, and a search
would compare trials trained on either: :func:`check_same_data` refuses that before anything
trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bldseg.data import readers

if TYPE_CHECKING:
    from bldseg.data.prepare import PreparedData


def data_record(fingerprint: str, content: str | None = None) -> dict[str, Any]:
    """What a run or search records of its training data, for :func:`check_same_data`.

    Args:
        fingerprint: The training cache's fingerprint
            (:attr:`~bldseg.data.cache.DatasetCache.fingerprint`).
        content: Its content digest (:attr:`~bldseg.data.cache.DatasetCache.content`).

    Returns:
        ``data_fingerprint``, ``data_content`` and ``decode_rules``: the version of bldseg's
        decoding rules (:data:`bldseg.data.readers.DECODE_RULES`), which the fingerprint holds
        too but cannot tell apart from a change of the data.
    """
    return {
        "data_fingerprint": fingerprint,
        "data_content": content,
        "decode_rules": readers.DECODE_RULES,
    }


def data_source(data: PreparedData) -> str | None:
    """What ``data`` was read from, as :func:`check_same_data` names it (None: the built-in
    synthetic world)."""
    return None if data.kind == "synthetic" else str(data.root)


def check_same_data(
    where: str,
    run: str,
    recorded: Mapping[str, Any],
    fingerprint: str,
    data: str | None,
    *,
    consequence: str,
    remedy: str,
    content: str | None = None,
) -> None:
    """Refuses to continue a run or search on training data other than those it started on.

    The cache's fingerprint also changes when bldseg decodes masks differently
    (:data:`bldseg.data.readers.DECODE_RULES`), through no change of the user's: the record's
    ``decode_rules`` tells the two apart (a record from before it was kept cannot, and says
    both). A record without a fingerprint (an older bldseg's) cannot be checked and is let go.

    Args:
        where: What the message starts with: the record (``runs/a/last.pt``) or the command
            (``--resume a1``).
        run: What is continued, for the message: ``"run"``, ``"search"``.
        recorded: The record (:func:`data_record`'s keys; others are ignored).
        fingerprint: The training cache's fingerprint now.
        data: The data source, for the message (None: the built-in synthetic world).
        consequence: What continuing would do, for the message.
        remedy: What to do instead, for the message.
        content: The training cache's content digest now. Where the record has one too, it
            decides: the fingerprint is of paths and file times, so the same data read from
            another folder, regenerated (the built-in world), or copied without their times
            change it, and a viewer's ``.aux.xml`` beside a TIFF does too.

    Raises:
        ValueError: The data differ (by content digest where both have one, else by
            fingerprint).
    """
    started_on = recorded.get("data_fingerprint")
    if content and recorded.get("data_content"):
        if recorded["data_content"] == content:
            return
    elif not started_on or started_on == fingerprint:
        return
    rules = recorded.get("decode_rules")
    if rules is not None and rules != readers.DECODE_RULES:
        raise ValueError(
            f"{where}: bldseg's image or mask decoding changed since this {run} started "
            f"(rules {rules} -> {readers.DECODE_RULES}: see bldseg.data.readers.DECODE_RULES); "
            f"the cache is rebuilt and decoded differently, so the {run} cannot continue on it: "
            f"{remedy}"
        )
    since = " (or bldseg's image or mask decoding changed since)" if rules is None else ""
    if content and recorded.get("data_content"):
        what = f"content {content}, recorded {recorded['data_content']}"
        put_back = " (or put back the images and masks it started on)"
    else:  # an older record: file stats only, so files put back with new times still differ
        what = f"fingerprint {fingerprint}, recorded {started_on}"
        put_back = (
            " (or put back the files it started on: the fingerprint covers their paths, sizes "
            "and modification times, and georeference sidecars such as .aux.xml)"
        )
    raise ValueError(
        f"{where}: the training data differ from those the {run} started on{since} "
        f"({what}; data {data or 'built-in synthetic'}); {consequence}: {remedy}{put_back}"
    )
