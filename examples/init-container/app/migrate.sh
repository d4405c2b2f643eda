#!/bin/sh
# The init container's command, run by kubelock while it holds the lock
# `migrations`:  kubelock --name migrations -- sh /app/migrate.sh
# In a Django project this would be `python manage.py migrate --noinput`.
set -eu
echo "migrate.sh: $(date -u +%H:%M:%S) ${POD_NAME:-$(hostname)} holds the lock, migrating"
exec python3 "$(dirname "$0")/manage.py" migrate
