"""LightningModule, DataModules, radius / loss-weight schedules, callbacks and strategies of ``critsample fit``."""
