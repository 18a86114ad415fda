/* placeholder, replaced below */
#include "postgres.h"
#include "psp.h"
static bool pp_build(PspJob *job, PspRequest *req) { psp_set_outcome(job, PSP_REJECTED, NULL, "paypal not yet"); return false; }
static void pp_handle(PspJob *job, PspResponse *resp) { psp_transport_outcome(job, resp); }
const PspAdapter psp_paypal_adapter = {"paypal", pp_build, pp_handle};
