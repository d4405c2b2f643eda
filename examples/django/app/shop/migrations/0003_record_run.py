"""A slow data migration: it records that it ran, then takes as long as a real backfill.

Each run writes one MigrationRun row (this migration, the Pod's host name), so
the table shows how many times it ran: once, when the migrations run one at a
time. It then waits MIGRATION_SECONDS (default 2): the time in which another,
unlocked `migrate` would run into this one.
"""

import os
import socket
import time
from typing import Any

from django.db import migrations
from django.utils import timezone


def record_run(apps: Any, schema_editor: Any) -> None:
    migration_run = apps.get_model("shop", "MigrationRun")
    migration_run.objects.create(
        migration="shop.0003_record_run", host=socket.gethostname(), ran_at=timezone.now()
    )
    time.sleep(float(os.environ.get("MIGRATION_SECONDS", "2")))


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_order")]

    operations = [migrations.RunPython(record_run, migrations.RunPython.noop)]
