import os

from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, JsonResponse

from .models import MigrationRun


def healthz(request: HttpRequest) -> JsonResponse:
    """Ready once the database answers and has every migration this version of the app knows."""
    executor = MigrationExecutor(connection)
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        names = [f"{migration.app_label}.{migration.name}" for migration, _ in pending]
        return JsonResponse({"status": "unmigrated", "pending": names}, status=503)
    runs = MigrationRun.objects.order_by("id").values_list("migration", "host")
    return JsonResponse(
        {
            "status": "ok",
            "host": os.environ.get("HOSTNAME", ""),
            "migration_runs": [{"migration": m, "host": h} for m, h in runs],
        }
    )
