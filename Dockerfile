FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY agents ./agents
COPY topics ./topics
COPY schemas ./schemas
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
