import json
from typing import Any

from django.core.management.base import BaseCommand

from shop.models import MigrationRun


class Command(BaseCommand):
    help = "Print one JSON line per run of a data migration (migration, host, ran_at)."

    def handle(self, *args: Any, **options: Any) -> None:
        for run in MigrationRun.objects.order_by("id"):
            line = {"migration": run.migration, "host": run.host, "ran_at": run.ran_at.isoformat()}
            self.stdout.write(json.dumps(line))
