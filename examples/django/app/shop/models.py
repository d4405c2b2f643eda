from django.db import models


class Customer(models.Model):
    name = models.CharField(max_length=200)
    email = models.EmailField(unique=True)


class Order(models.Model):
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="orders")
    total = models.DecimalField(max_digits=10, decimal_places=2)
    placed_at = models.DateTimeField(auto_now_add=True)


class MigrationRun(models.Model):
    """A row a data migration writes each time it runs: more than one per migration is a bug."""

    migration = models.CharField(max_length=200)
    host = models.CharField(max_length=253)
    ran_at = models.DateTimeField()
