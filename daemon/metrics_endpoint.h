#pragma once

#include <string>

#include "lib/billing/overage_worker.h"
#include "lib/http/http_server.h"
#include "lib/ingest/ingestor.h"

namespace meterd::daemon {

// Answers /metrics, /healthz and /readyz from the ingestor's and overage worker's atomics.
// `ingestor` is null while meterd starts (/healthz 200, /readyz and /metrics 503 until it
// exists); any other path is 404 either way. `overage` may be null (--billing=false).
http::Response ServeEndpoint(const std::string& path, const ingest::Ingestor* ingestor,
                             const billing::OverageWorker* overage);

}  // namespace meterd::daemon
