"""Where large results go (generated images, big job results): files under the data dir or S3.

Below both the inference service (a txt2img response carries a URL) and the job store (a large
job result is stored once and streamed back), so neither has to import the other.
"""
