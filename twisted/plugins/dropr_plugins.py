"""twistd plugins: ``twistd dropr-server`` and ``twistd dropr-client``."""

from twisted.application.service import ServiceMaker

dropr_server = ServiceMaker(
    "dropr server", "dropr.server.tap", "Receive dropr messages into a store.", "dropr-server"
)
dropr_client = ServiceMaker(
    "dropr client", "dropr.client.tap", "Forward a dropr spool to its servers.", "dropr-client"
)
