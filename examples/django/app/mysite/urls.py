from django.urls import path
from shop.views import healthz

urlpatterns = [path("healthz", healthz)]
