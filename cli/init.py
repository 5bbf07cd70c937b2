"""``labkeeper init`` and ``labkeeper proxmox token``: start from an existing lab."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from labkeeper import init as lk_init
from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, LabkeeperError
from labkeeper.secrets import redact

proxmox_app = typer.Typer(no_args_is_help=True, help="Proxmox helpers.")


def build_options(*, proxmox: str | None, token_id: str | None, token_secret: str | None,
                  fingerprint: str | None, ca_file: str | None, postgres: str | None,
                  pg_user: str, pg_password: str | None, name: str | None
                  ) -> lk_init.InitOptions:
    """Check the command line and turn it into :class:`InitOptions` (pure)."""
    lk_init.check_ref("--token-secret", token_secret)
    lk_init.check_ref("--pg-password", pg_password)
    pg = None
    if postgres:
        host, port = lk_init.parse_host_port(postgres)
        pg = lk_init.PgServer(host, port, pg_user, pg_password)
    if proxmox is None:
        return lk_init.InitOptions(lab_name=name or "homelab", postgres=pg)
    if not token_id or not token_secret:
        raise lk_init.InitError("--proxmox needs --token-id and --token-secret (a reference)")
    host, port = lk_init.parse_proxmox_url(proxmox)
    if fingerprint:
        fingerprint = px.format_fingerprint(fingerprint)
    default_name = lk_init.sanitize_name(host.split(".")[0], 0) if not host[0].isdigit() \
        else "homelab"
    return lk_init.InitOptions(lab_name=name or default_name, proxmox_host=host,
                               proxmox_port=port, token_id=token_id, token_secret=token_secret,
                               fingerprint=fingerprint, ca_file=ca_file, postgres=pg)


def read_and_render(opts: lk_init.InitOptions) -> str:
    """Read the cluster and the database server (when given), render the inventory."""
    facts = None
    if opts.proxmox_host is not None:
        spec = px.ConnectionSpec(opts.proxmox_host, opts.proxmox_port, opts.token_id or "",
                                 opts.token_secret or "", 30,
                                 px.TlsOptions(ca_file=opts.ca_file,
                                               fingerprint=opts.fingerprint))
        facts = lk_init.read_cluster(px.connect(spec))
    databases = lk_init.read_databases(opts.postgres) if opts.postgres else []
    return lk_init.render_valid(opts, facts, databases)


def write_inventory(text: str, output: Path, *, force: bool) -> None:
    """Write atomically; never over an existing file without ``force``."""
    if output.exists() and not force:
        raise lk_init.InitError(f"{output} exists: not overwritten (use --force)")
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output)


def init_command(
    proxmox: Annotated[str | None, typer.Option(
        help="Proxmox API address: https://HOST:8006 (or HOST).")] = None,
    token_id: Annotated[str | None, typer.Option(help="API token id USER@REALM!NAME.")] = None,
    token_secret: Annotated[str | None, typer.Option(
        help="Reference to the token secret: env:NAME, file:/path or prefect-block:NAME.")
    ] = None,
    fingerprint: Annotated[str | None, typer.Option(
        help="Pin the API certificate's SHA-256 fingerprint (AA:BB:...).")] = None,
    ca_file: Annotated[str | None, typer.Option(
        help="CA file for the API certificate (/etc/pve/pve-root-ca.pem).")] = None,
    postgres: Annotated[str | None, typer.Option(
        help="PostgreSQL server HOST:PORT whose databases to back up.")] = None,
    pg_user: Annotated[str, typer.Option(help="PostgreSQL user.")] = "postgres",
    pg_password: Annotated[str | None, typer.Option(
        help="Reference to the PostgreSQL password (env:NAME, file:/path...).")] = None,
    name: Annotated[str | None, typer.Option(help="The lab's name.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Inventory to write.")
                      ] = Path("lab.yaml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the inventory; write nothing.")
                       ] = False,
) -> None:
    """Write an inventory of an existing lab (Proxmox guests, storages, backup jobs,
    databases), validated; with no --proxmox: database backups only."""
    try:
        opts = build_options(proxmox=proxmox, token_id=token_id, token_secret=token_secret,
                             fingerprint=fingerprint, ca_file=ca_file, postgres=postgres,
                             pg_user=pg_user, pg_password=pg_password, name=name)
        if output.exists() and not force and not dry_run:
            raise lk_init.InitError(f"{output} exists: not overwritten (use --force)")
        text = read_and_render(opts)
        inv = lk_init.validate_rendered(text, str(output))
    except ConfigError as exc:
        print("\n".join([f"init: {exc}", *exc.problems]), file=sys.stderr)
        raise typer.Exit(2) from None
    except LabkeeperError as exc:
        print(f"init: {redact(str(exc))}", file=sys.stderr)
        raise typer.Exit(1) from None
    if dry_run:
        sys.stdout.write(text)
        return
    write_inventory(text, output, force=force)
    print(f"wrote {output}: {lk_init.summary(inv)}")
    print(f"next: labkeeper validate {output}; labkeeper provision plan -l {output}")


@proxmox_app.command("token")
def proxmox_token(
    user: Annotated[str, typer.Option(help="The Proxmox user to create.")] = "labkeeper@pve",
    name: Annotated[str, typer.Option("--token", help="The token's name.")] = "automation",
    role: Annotated[str, typer.Option(help="The role to create.")] = "LabKeeper",
) -> None:
    """Print the pveum commands for a least-privilege role, user and API token."""
    print("# on a Proxmox node, as root:")
    for line in lk_init.token_commands(user, name, role):
        print(line)
    print("# put the printed token secret where proxmox.token_secret points "
          "(file:/etc/labkeeper/pve-token, mode 0600)")


def register(app: typer.Typer) -> None:
    app.command("init")(init_command)
    app.add_typer(proxmox_app, name="proxmox")
