"""`appliance ...`: the services and the field engineer's commands, in one tool.

    appliance run                 start every enabled service and keep them alive
    appliance dicom               the DICOM receiver alone (what its systemd unit runs)
    appliance convert             the store-format converter alone ([storage] format)
    appliance forward             the forwarder alone ([[destination]] sections)
    appliance disks [ACTION]      the disk service alone, or status|adopt|copy|verify|rebuild|rescan
    appliance web                 the status page, /api/status and /metrics alone ([web])
    appliance queue [...]         the forward queue: list, retry, drop, pause, resume
    appliance send --to NAME ...  queue a study or a patient for a destination again
    appliance status [--json]     what is running, images today, disk space
    appliance find [...] [--json] which images the gateway holds, and where
    appliance import PATH...      bring DICOM files in (a CD, a USB stick, a folder)
    appliance check [--verify]    fsck for the archive: re-index lost files, report missing ones
    appliance transcode IN OUT --to CLASS|UID   convert one file (the archive's converter)
    appliance config show|check   the settings in force / check a file before use

The configuration comes from --config FILE, else $APPLIANCE_CONFIG, else
/etc/appliance/appliance.toml when it exists (the appliance image), else the
embedded defaults. A configuration error stops every command with a message
naming the file and key, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys

from appliance import __version__, config
from appliance.archive.index import SchemaMismatch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="DICOM gateway appliance: receive, archive, forward and keep images safe.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help=f"configuration file (default: ${config.CONFIG_ENV}, else built-in defaults)")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    commands.add_parser("run", help="start every enabled service and keep them running")
    commands.add_parser("dicom", help="run the DICOM receiver (Verification + Storage SCP)")
    commands.add_parser("convert", help="run the store-format converter ([storage] format)")
    commands.add_parser("forward", help="run the forwarder ([[destination]] sections)")
    commands.add_parser("web", help="run the status page, /api/status and /metrics ([web])")

    status = commands.add_parser("status", help="what is running, images today, disk space")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    find = commands.add_parser("find", help="list archived images matching criteria")
    find.add_argument("--patient-id", metavar="ID")
    find.add_argument("--patient-name", metavar="TEXT", help="part of any name group (kanji, kana too)")
    find.add_argument("--study-date", metavar="YYYYMMDD", help="a date or a range YYYYMMDD-YYYYMMDD")
    find.add_argument("--modality", metavar="M", help="CR, CT, MR, US, ...")
    find.add_argument("--accession", metavar="NUMBER")
    find.add_argument("--study", metavar="UID", help="Study Instance UID")
    find.add_argument("--limit", type=int, metavar="N")
    find.add_argument("--json", action="store_true", help="one JSON object per image")

    chk = commands.add_parser("check", help="fsck for the archive: re-index lost files, report missing ones")
    chk.add_argument("--verify", action="store_true", help="also compare every file with its checksum")
    chk.add_argument("--json", action="store_true", help="the report as one JSON object")

    imp = commands.add_parser("import", help="archive DICOM files or folders (a CD, a USB stick)")
    imp.add_argument("paths", nargs="+", metavar="PATH")
    imp.add_argument("--json", action="store_true", help="print only a JSON summary")

    trans = commands.add_parser("transcode", help="convert one DICOM file to another transfer syntax")
    trans.add_argument("input", metavar="IN")
    trans.add_argument("output", metavar="OUT")
    trans.add_argument("--to", required=True, metavar="CLASS|UID",
                       help="uncompressed, lossless, lossy ([storage] syntaxes), or a UID/keyword")
    trans.add_argument("--json", action="store_true", help="machine-readable report")

    que = commands.add_parser("queue", help="forward queue: list, retry, drop, pause, resume")
    que.add_argument("action", nargs="?", choices=["retry", "drop", "pause", "resume"])
    que.add_argument("targets", nargs="*", metavar="JOB|NAME")
    que.add_argument("--destination", metavar="NAME")
    que.add_argument("--state", choices=["pending", "sending", "done", "failed", "dropped"])
    que.add_argument("--all", action="store_true", help="with retry: every failed job")
    que.add_argument("--failed", action="store_true", help="with drop: every failed job")
    que.add_argument("--json", action="store_true", help="one JSON object per job")

    snd = commands.add_parser("send", help="queue archived images for a destination again")
    snd.add_argument("--to", required=True, metavar="NAME")
    which = snd.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID")
    which.add_argument("--patient-id", metavar="ID")

    dsk = commands.add_parser("disks", help="external disks: the service, or a command (status, adopt, ...)")
    dsk.add_argument("action", nargs="?", choices=["status", "adopt", "copy", "verify", "rebuild", "rescan"])
    dsk.add_argument("label", nargs="?", metavar="LABEL")
    dsk.add_argument("--role", choices=["primary", "mirror", "spare"])
    dsk.add_argument("--pair", type=int, metavar="N")
    dsk.add_argument("--from", dest="source", metavar="LABEL", help="with rebuild: the surviving disk")
    dsk.add_argument("--force", metavar="WORD", help="with adopt: take over another appliance's disk "
                     "(WORD must be 'takeover'; written to the audit trail)")
    dsk.add_argument("--json", action="store_true")

    cfg = commands.add_parser("config", help="show the settings in force, or check a file")
    cfg.add_argument("action", choices=["show", "check"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config.load(args.config)
    except config.ConfigError as exc:
        print(f"appliance: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args, settings)
    except SchemaMismatch as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:  # a damaged or unreadable index: one line, no traceback
        print(f"appliance: the index in {settings.data_dir} cannot be read: {exc}; see "
              "`appliance check`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _command_logging(quiet: bool) -> None:
    """Field-engineer commands print their own report; log lines only for trouble."""
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING,
        format="appliance: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def _dispatch(args: argparse.Namespace, settings: config.Settings) -> int:
    if args.command not in ("run", "dicom", "convert", "forward", "web") and not (
            args.command == "disks" and not args.action):
        _command_logging(quiet=getattr(args, "json", False))
    if args.command == "run":
        from appliance.supervisor import Supervisor

        return Supervisor(settings, args.config).run()
    if args.command == "config":
        if args.action == "show":
            print(f"# settings in force, from {settings.source}")
            print(config.to_toml(settings), end="")
        else:
            print(f"{settings.source}: configuration is valid")
        return 0
    if args.command == "status":
        from appliance.commands import status

        return status.main(settings, args.json)
    if args.command == "find":
        from appliance.commands import find

        try:
            return find.main(
                settings,
                args.json,
                patient_id=args.patient_id,
                patient_name=args.patient_name,
                study_date=args.study_date,
                modality=args.modality,
                accession_number=args.accession,
                study_instance_uid=args.study,
                limit=args.limit,
            )
        except find.UsageError as exc:
            print(f"appliance find: {exc}", file=sys.stderr)
            return 2
    if args.command == "disks" and args.action:
        from appliance.commands import disks

        return disks.main(settings, args.action, args.label, args.role, args.pair, args.json, args.source,
                          args.force)
    if args.command in ("queue", "send"):
        from appliance.commands import queue

        if args.command == "send":
            return queue.send(settings, args.to, args.study, args.patient_id)
        if args.action == "retry":
            return queue.retry(settings, args.targets, args.all)
        if args.action == "drop":
            return queue.drop(settings, args.targets, args.failed)
        if args.action in ("pause", "resume"):
            if len(args.targets) != 1:
                print(f"appliance queue {args.action}: give one destination name", file=sys.stderr)
                return 2
            return queue.pause(settings, args.targets[0], args.action == "pause")
        return queue.show(settings, args.destination, args.state, args.json)
    if args.command == "transcode":
        from appliance.commands import transcode

        return transcode.main(settings, args.input, args.output, args.to, args.json)
    if args.command == "check":
        from appliance.commands import check

        return check.main(settings, args.verify, args.json)
    if args.command == "import":
        from appliance.commands import importer

        return importer.main(settings, args.paths, args.json)
    from appliance.services import SERVICES

    return SERVICES[args.command].main(settings)
