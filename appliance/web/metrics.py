"""/metrics: the same report as the page, for a hospital's Prometheus or Zabbix.

A custom collector builds the samples at scrape time from the report, so
there is no second bookkeeping to drift from what the page shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector


class ReportCollector(Collector):
    def __init__(self, report: Callable[[], dict[str, Any]]) -> None:
        self.report = report

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        report = self.report()
        up = GaugeMetricFamily("appliance_service_up", "1 when the service runs (enabled ones only)",
                               labels=["service"])
        for service in report["services"]:
            if service["enabled"]:
                up.add_metric([service["service"]], 1.0 if service["state"] == "running" else 0.0)
        yield up
        archive = report["archive"]
        yield GaugeMetricFamily("appliance_archive_images", "images in the archive index",
                                value=archive["instances"])
        yield GaugeMetricFamily("appliance_archive_bytes", "bytes of the archived images",
                                value=archive["bytes"])
        yield GaugeMetricFamily("appliance_images_received_today", "images received today",
                                value=archive["instances_today"])
        yield GaugeMetricFamily("appliance_images_rejected_today", "images quarantined today",
                                value=archive["rejected_today"])
        yield GaugeMetricFamily("appliance_patient_ids_with_several_names",
                                "patient IDs whose images arrived under more than one name",
                                value=archive.get("patient_ids_with_several_names", 0))
        yield CounterMetricFamily("appliance_conversions_refused",
                                  "conversions refused by the check (original kept), all time",
                                  value=archive.get("conversions_refused", 0))
        yield GaugeMetricFamily("appliance_internal_disk_free_bytes", "free bytes of the data disk",
                                value=report["disk"]["free_bytes"])
        yield GaugeMetricFamily("appliance_internal_disk_total_bytes", "size of the data disk",
                                value=report["disk"]["total_bytes"])
        queue = {state: GaugeMetricFamily(f"appliance_forward_{state}", f"images {state} per destination",
                                          labels=["destination"]) for state in ("pending", "failed")}
        reachable = GaugeMetricFamily("appliance_destination_reachable", "1 when the last check answered",
                                      labels=["destination"])
        free = GaugeMetricFamily("appliance_external_disk_free_bytes", "free bytes per external disk",
                                 labels=["label", "role", "pair"])
        total = GaugeMetricFamily("appliance_external_disk_total_bytes", "size per external disk",
                                  labels=["label", "role", "pair"])
        mounted = GaugeMetricFamily("appliance_external_disk_mounted", "1 when the disk is present",
                                    labels=["label", "role", "pair"])
        images = GaugeMetricFamily("appliance_external_disk_images", "verified copies per external disk",
                                   labels=["label", "role", "pair"])
        healthy = GaugeMetricFamily("appliance_external_disk_healthy", "1 when the disk is mounted, trusted, "
                                    "writable and its last write went well", labels=["label", "role", "pair",
                                                                                     "state"])
        warnings = 0
        for service in report["services"]:
            warnings += len(service.get("warnings") or [])
            for name, dest in (service.get("destinations") or {}).items():
                for state, family in queue.items():
                    family.add_metric([name], dest.get(state, 0))
                reachable.add_metric([name], 1.0 if dest.get("reachable") else 0.0)
            for disk in service.get("disks") or []:
                labels = [disk["label"], disk["role"], str(disk["pair"])]
                mounted.add_metric(labels, 1.0 if disk.get("mounted") else 0.0)
                images.add_metric(labels, disk.get("instances", 0))
                state = disk.get("state", "")
                healthy.add_metric([*labels, state], 1.0 if state in ("active", "ready", "full") else 0.0)
                if disk.get("mounted"):
                    free.add_metric(labels, disk["free_bytes"])
                    total.add_metric(labels, disk["total_bytes"])
        yield from queue.values()
        yield from (reachable, free, total, mounted, images, healthy)
        yield GaugeMetricFamily("appliance_warnings", "warnings the services publish (see the page)",
                                value=warnings)


def exposition(report: Callable[[], dict[str, Any]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(report))
    return generate_latest(registry)
