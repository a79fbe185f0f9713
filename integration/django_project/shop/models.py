from django.db import models


class Order(models.Model):
    ref = models.CharField(max_length=64)
