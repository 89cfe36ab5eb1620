"""The archive: layout, the one ingest door, the SQLite index, quarantine."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.archive.ingest import Archive
    from appliance.config import Settings


def open_archive(settings: Settings) -> Archive:
    """The archive as every producer must use it: reserve and hooks from the settings.

    The store-format rule ([storage] format) queues a conversion, and the
    routing rules ([[destination]] match) queue forward jobs, in the same
    transaction as the index row, whoever brought the object in.
    """
    from appliance.archive.ingest import Archive
    from appliance.dicom.structure import Limits
    from appliance.forward.routing import ForwardRouter
    from appliance.transcode.pipeline import StorePolicy

    node = settings.node
    limits = Limits(max_depth=node.max_sequence_depth, max_inflated=node.max_inflated_mb * 1024 * 1024,
                    max_ratio=node.max_inflate_ratio)
    archive = Archive(settings.data_dir, min_free_bytes=node.min_free_mb * 1_000_000, limits=limits)
    if settings.storage.format != "as-received":
        archive.on_indexed.append(StorePolicy(settings.storage).queue_conversion)
    if settings.destinations:
        archive.on_indexed.append(ForwardRouter(settings.destinations).queue_jobs)
    return archive
