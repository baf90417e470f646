// Drives the head's dashboard in headless Chromium for the test
// `the_dashboard_shows_the_cluster_and_a_job_in_a_browser` (tests/cluster.rs), which
// starts the cluster and the job and checks what this prints (one JSON line).
//
// Environment: DASHBOARD_URL, VOLLEY_TOKEN, JOB (a running job), BIG (a job asking for
// more than any node has), NODES (live nodes), OUT (folder for screenshots), CHROMIUM
// (the browser).
import { chromium } from "playwright-core";

const { DASHBOARD_URL, VOLLEY_TOKEN, JOB, BIG, NODES, OUT, CHROMIUM } = process.env;
const report = {};
// A fresh profile per launch (Playwright's default), nothing fetched from outside.
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const external = [];
  page.on("request", r => { if (!r.url().startsWith(DASHBOARD_URL)) external.push(r.url()); });
  await page.goto(DASHBOARD_URL);

  // Without the token: the login form, and the API refuses.
  await page.waitForSelector("#login");
  report.api_without_token = await page.evaluate(async () => (await fetch("/api/jobs")).status);
  await page.fill("#token", "not-the-token");
  await page.click("#login button");
  await page.waitForSelector("#login-error:has-text('wrong cluster token')");
  report.refused = await page.textContent("#login-error");
  await page.screenshot({ path: `${OUT}/refused.png` });

  // With it: the cluster's nodes and the job.
  await page.fill("#token", VOLLEY_TOKEN);
  await page.click("#login button");
  await page.waitForSelector(`#nodes-alive:text-is("${NODES}")`);
  await page.waitForSelector(`#jobs a:text-is("${JOB}")`);
  report.nodes_alive = Number(await page.textContent("#nodes-alive"));
  // The job no node can start says why, in the list and on its page.
  const bigRow = `#jobs tr:has(a:text-is("${BIG}")) .waiting`;
  await page.waitForSelector(`${bigRow}:has-text("no node has")`);
  report.big_waiting_in_list = await page.textContent(bigRow);
  await page.click(`#jobs a:text-is("${BIG}")`);
  await page.waitForSelector("#job-waiting");
  report.big_waiting_on_page = await page.textContent("#job-waiting");
  await page.goBack();
  await page.waitForSelector(`#jobs a:text-is("${JOB}")`);
  report.node_rows = await page.locator("#nodes tr").count() - 1;
  await page.screenshot({ path: `${OUT}/overview.png`, fullPage: true });

  // The job: its operators progress while it runs, then its log.
  await page.click(`#jobs a:text-is("${JOB}")`);
  await page.waitForSelector("table.execution tr.operator", { timeout: 60000 });
  report.operators = await page.locator("table.execution").first().locator("tr.operator td:nth-child(2)").allTextContents();
  report.tasks_done_seen = [];
  for (let i = 0; i < 60; i++) {
    const done = await page.locator("table.execution").first().locator("tr.operator span.done").first().textContent();
    report.tasks_done_seen.push(Number(done));
    if ((await page.textContent("#job-state")) !== "RUNNING") break;
    if (i === 2) await page.screenshot({ path: `${OUT}/job-running.png`, fullPage: true });
    await page.waitForTimeout(500);
  }
  await page.waitForSelector('#job-state:text-is("SUCCEEDED")', { timeout: 120000 });
  await page.waitForSelector("#log:has-text('wrote ')", { timeout: 30000 });
  report.log = await page.textContent("#log");
  report.state = await page.textContent("#job-state");
  await page.screenshot({ path: `${OUT}/job-done.png`, fullPage: true });
  report.external_requests = external;
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
