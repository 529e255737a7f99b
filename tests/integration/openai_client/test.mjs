// The official `openai` npm client against a Petrel gateway. Run by tests/integration/test_openai_npm.cpp:
//   PETREL_BASE_URL=http://127.0.0.1:PORT/v1 PETREL_MODEL=fortune-moe node test.mjs
// Exits 0 when every check holds; otherwise prints what failed and exits 1.
import OpenAI from 'openai';

const baseURL = process.env.PETREL_BASE_URL;
const model = process.env.PETREL_MODEL || 'fortune-moe';
if (!baseURL) {
  console.error('test.mjs: set PETREL_BASE_URL (for example http://127.0.0.1:8080/v1)');
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey: 'petrel-needs-no-key', timeout: 60_000, maxRetries: 0 });
let failures = 0;
function check(cond, what) {
  if (cond) {
    console.log(`ok   ${what}`);
  } else {
    console.log(`FAIL ${what}`);
    failures++;
  }
}

// 1. The model list.
const models = await client.models.list();
const ids = [];
for await (const m of models) ids.push(m.id);
check(ids.includes(model), `models.list() names ${model} (got ${JSON.stringify(ids)})`);

// 2. A plain completion.
const completion = await client.completions.create({
  model,
  prompt: 'The meaning of life is',
  max_tokens: 16,
  temperature: 0,
});
const text = completion.choices?.[0]?.text ?? '';
check(completion.object === 'text_completion', `completions.create() object is text_completion`);
check(text.length > 0, `completions.create() returned text: ${JSON.stringify(text)}`);
check(completion.usage?.completion_tokens > 0 && completion.usage.completion_tokens <= 16,
      `completion usage counts 1..16 tokens (${completion.usage?.completion_tokens})`);
check(['stop', 'length'].includes(completion.choices?.[0]?.finish_reason),
      `completion finish_reason ${completion.choices?.[0]?.finish_reason}`);

// 3. A streamed chat completion, chunk by chunk.
const stream = await client.chat.completions.create({
  model,
  messages: [{ role: 'user', content: 'Tell me a fortune.' }],
  max_tokens: 24,
  temperature: 0.7,
  seed: 7, // sampled, but the same every run (an unseeded draw may pick EOS first and stream no text)
  ignore_eos: true,
  stream: true,
  stream_options: { include_usage: true },
});
let chunks = 0;
let streamed = '';
let finish = null;
let usage = null;
for await (const chunk of stream) {
  chunks++;
  if (chunk.object !== 'chat.completion.chunk') throw new Error(`unexpected chunk object ${chunk.object}`);
  const choice = chunk.choices?.[0];
  if (choice?.delta?.content) streamed += choice.delta.content;
  if (choice?.finish_reason) finish = choice.finish_reason;
  if (chunk.usage) usage = chunk.usage;
}
// The for-await loop only ends when the client saw the stream end ([DONE] / end of body).
check(chunks >= 3, `chat stream delivered ${chunks} chunks`);
check(streamed.length > 0, `chat stream carried text: ${JSON.stringify(streamed)}`);
check(finish === 'stop' || finish === 'length', `chat stream ended with finish_reason ${finish}`);
check(usage !== null && usage.completion_tokens > 0, `chat stream sent a usage chunk (${JSON.stringify(usage)})`);

// 4. An error the server refuses comes back as the client's typed error, not a hang.
try {
  await client.completions.create({ model, prompt: 'x', max_tokens: 100000 });
  check(false, 'an over-long max_tokens is refused');
} catch (e) {
  check(e instanceof OpenAI.BadRequestError, `an over-long max_tokens is refused with 400 (${e.status} ${e.message})`);
}

if (failures) {
  console.error(`test.mjs: ${failures} check(s) failed`);
  process.exit(1);
}
console.log('test.mjs: all checks passed');
